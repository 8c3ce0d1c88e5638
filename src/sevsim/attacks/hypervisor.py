"""Attacks by a malicious hypervisor: it owns the host kernel, KVM, the NPT and the VMCBs,
and talks to the firmware through /dev/sev — but holds no guest key."""

from __future__ import annotations

from sevsim.attacks.lab import AttackResult, RawGuestMemory, attack, start_guest, victim_view
from sevsim.guest import kernel as guest_kernel
from sevsim.host.kvm import KvmError
from sevsim.profiles import MachineProfile
from sevsim.system import HostSystem

POLICY_DEBUG = 0x0  # debugging allowed
POLICY_NODBG = 0x1


@attack(
    "host-read",
    "The hypervisor reads a guest's private memory",
    """The hypervisor maps all of a guest's memory and reads the page where the guest
    kernel keeps its secret, through its own mapping (host key) and raw (no C-bit). Both
    give ciphertext under the guest's VEK. Then it asks the firmware: DBG_DECRYPT returns
    the plaintext of a guest whose owner allowed debugging, and POLICY_FAILURE for a guest
    with the NODBG policy bit.""",
    "SEV memory encryption (the VEK never leaves the memory controller) and the NODBG policy",
)
def host_read(profile: MachineProfile, r: AttackResult) -> None:
    with HostSystem.start(profile) as system:
        for name, policy in (("debuggable", POLICY_DEBUG), ("nodbg", POLICY_NODBG)):
            vm = start_guest(system, name, policy=policy)
            vm.run()
            gpa = guest_kernel.DATA_BASE  # the guest kernel's first data page
            secret = victim_view(system, vm).secret
            system.kernel.wbinvd_on_all_cpus()  # no stale host-domain lines of the page
            mapped = vm.read(gpa, len(secret))
            raw = RawGuestMemory(system, vm, gpa).read(0, len(secret))
            r.step(
                f"{name} (policy {policy:#x}, ASID {vm.asid}): the hypervisor's mapping reads "
                f"{mapped[:16].hex()}…, the raw C=0 mapping {raw[:16].hex()}…"
            )
            try:
                plain = vm.sev_dbg_decrypt(gpa, len(secret))
                status = "SUCCESS"
            except KvmError as exc:
                plain, status = b"", exc.status.name if exc.status else str(exc)
            r.step(f"{name}: DBG_DECRYPT → {status}" + (f": {plain!r}" if plain else ""))
            leaked = secret in (mapped, raw, plain)
            r.figures[name] = {
                "policy": policy,
                "mapping_reads_plaintext": mapped == secret,
                "raw_reads_plaintext": raw == secret,
                "dbg_decrypt": status,
                "secret_recovered": leaked,
            }
            vm.destroy()
    # The goal: the secret of a guest that forbade debugging.
    r.succeeded = r.figures["nodbg"]["secret_recovered"]


@attack(
    "wrong-asid",
    "Security by crash: a guest run with another guest's ASID",
    """The hardware checks only that a VMCB's ASID is a valid SEV ASID, not whose it is.
    The hypervisor runs guest alpha with beta's ASID: alpha's code, page tables and data
    are fetched with beta's key, decrypt to garbage, and the vCPU cannot even deliver the
    resulting fault — a triple fault, #VMEXIT(SHUTDOWN). The attacker looks at everything
    the crash gives it — exit codes, registers, the console — for either guest's secret.""",
    "the wrong key makes the victim's code undecodable: it crashes before it can run "
    "(CrossLine shows what leaks before the crash; see the crossline attack)",
)
def wrong_asid(profile: MachineProfile, r: AttackResult) -> None:
    with HostSystem.start(profile) as system:
        alpha, beta = start_guest(system, "alpha"), start_guest(system, "beta")
        for vm in (alpha, beta):
            vm.run()
        secrets = {vm.name: victim_view(system, vm).secret for vm in (alpha, beta)}
        r.step(f"alpha has ASID {alpha.asid}, beta ASID {beta.asid}; both ran to completion")
        alpha.vcpus[0].asid, beta.vcpus[0].asid = beta.asid, alpha.asid
        exits = {vm.name: vm.vcpus[0].run() for vm in (alpha, beta)}
        leaked = False
        for vm in (alpha, beta):
            e = exits[vm.name]
            r.step(f"{vm.name} run with the other's ASID: {e.reason} ({e.detail})")
            seen = bytes(vm.console) + str(e.detail).encode()
            seen += b"".join(str(v).encode() for v in vm.vcpus[0].regs.values())
            leaked |= any(s in seen for s in secrets.values())
        r.figures = {
            "exits": {name: e.reason for name, e in exits.items()},
            "crashed": all(e.reason in ("SHUTDOWN", "INTERNAL_ERROR") for e in exits.values()),
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
        vm = start_guest(system, "victim", workload="balance")
        vcpu = vm.vcpus[0]
        gpa = guest_kernel.DATA_BASE
        raw = RawGuestMemory(system, vm, gpa)
        first = vcpu.run()  # balance 100 written; the guest waits in HLT
        saved = raw.read(0, 16)
        r.step(f"after the first write the page holds {saved.hex()} (saved)")
        vcpu.run()  # balance 40 written
        after = raw.read(0, 16)
        r.step(f"after the payment it holds {after.hex()}")
        raw.write(0, saved)
        r.step("the hypervisor writes the saved ciphertext back")
        rest = vcpu.run()
        view = victim_view(system, vm)
        read = view.steps[-1] if view and view.steps else b""
        r.step(f"the guest reads {read.decode(errors='replace').strip()!r}")
        r.figures = {
            "exits": [first.reason, rest.reason],
            "ciphertext_changed_with_the_value": saved != after,
            "guest_read": read.decode(errors="replace").strip(),
        }
        r.succeeded = read.startswith(b"balance: 100")
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
        vm = start_guest(system, "victim", workload="flags")
        vcpu = vm.vcpus[0]
        raw = RawGuestMemory(system, vm, guest_kernel.DATA_BASE)
        seen: list[bytes] = []
        while len(seen) < 16 and vcpu.run().reason == "HLT":
            seen.append(raw.read(0, 16))
        vcpu.run()
        classes: dict[bytes, int] = {}
        bits = "".join(str(classes.setdefault(c, len(classes))) for c in seen)
        key = victim_view(system, vm).secret.decode()
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
