"""The SME and TSME parts of the demo, and the guest owner authenticating the platform.

The host kernel acts through its core. The physical view reads DRAM directly, as a cold-boot
attacker or a bus probe can; it is the only place here that looks below the memory
controller, and it only reads.
"""

from __future__ import annotations

import hashlib

from sevsim.attacks.physical import ColdBootDump
from sevsim.certs.chain import SevChain, builtin_root, verify_chain
from sevsim.certs.sev import SevCert
from sevsim.demo.steps import Step, Story, View, Working
from sevsim.host import HostKernel
from sevsim.host.sev import SevDevice
from sevsim.owner.trust import choose_root
from sevsim.platform import Platform
from sevsim.profiles import MachineProfile
from sevsim.soc import Machine, msr
from sevsim.system import HostSystem

SECRET = b"TOP SECRET: the launch code is 0451-SEVSIM. Only the CPU may read this line."
PUBLIC = b"PUBLIC: this page is shared (C=0); anyone with a DRAM dump can read it."


def _write_secret_and_public(kernel: HostKernel) -> tuple[int, int]:
    """A private page (the direct map's C=1) and a shared page (set to C=0), each written."""
    secret_va = kernel.alloc_pages(1)
    public_va = kernel.alloc_pages(1)
    kernel.set_memory_decrypted(public_va, 1)
    kernel.write(secret_va, SECRET)
    kernel.write(public_va, PUBLIC)
    return secret_va, public_va


def _view(
    label: str, mapping: str, kernel: HostKernel, dump: ColdBootDump, va: int, n: int
) -> View:
    pa = kernel.pa(va)
    return View(label, mapping, pa, kernel.read(va, n), dump.read(pa, n))


def sme_story(profile: MachineProfile) -> Story:
    yield Working(f"powering on an {profile.part}")
    platform = Platform(profile)
    machine = platform.machine
    core = machine.cores[0]
    dump = ColdBootDump(machine)

    # 1. Power on.
    eax, ebx, _, _ = core.cpuid(0x8000_001F)
    syscfg = core.rdmsr(msr.SYSCFG)
    s = Step(
        f"Power on an {profile.part} ({profile.generation})",
        "The memory controller draws a fresh host key; no software can read it. CPUID "
        "0x8000001F tells software that SME exists and which page-table bit is the C-bit; "
        "the BIOS option SMEE (SYSCFG bit 23) says whether the C-bit is honoured.",
        facts=[
            ("CPUID 8000_001F EAX", f"{eax:#010x} ({', '.join(profile.features()[:4])}, ...)"),
            ("C-bit", f"bit {ebx & 0x3F} of a page-table entry"),
            ("physical address bits lost", f"{(ebx >> 6) & 0x3F}"),
            ("SYSCFG", f"{syscfg:#x} (MemEncryptionModEn = {syscfg >> 23 & 1})"),
            ("AES engine", f"{machine.memctl.engine_mode}, AES-{profile.engine_key_bits}"),
        ],
    )
    s.check("CPUID reports SME", eax & 1)
    s.check("SYSCFG[23] MemEncryptionModEn is set", syscfg & msr.SYSCFG_MEM_ENCRYPT)
    yield s

    # 2. Boot the host kernel with SME.
    yield Working("booting Linux with mem_encrypt=on")
    kernel = HostKernel(core, cmdline="mem_encrypt=on")
    report = kernel.boot()
    banner = kernel.image[:48]
    s = Step(
        "Boot Linux with mem_encrypt=on",
        "sme_enable() checks CPUID, SEV_STATUS and SYSCFG; the kernel image, loaded in "
        "plaintext, is encrypted in place through two mappings of the same memory (an "
        "encrypted one, and a write-protected plaintext alias) after a WBINVD. Then CR3 is "
        "loaded with the C-bit: page tables and all kernel memory are encrypted from here on.",
        facts=[(f"kernel log {i + 1}", line) for i, line in enumerate(report.log)],
    )
    core.wbinvd()  # make DRAM current before looking at it
    image_view = View(
        "kernel image",
        "direct map, C=1",
        report.kernel_pa,
        kernel.read(kernel.va(report.kernel_pa), len(banner)),
        dump.read(report.kernel_pa, len(banner)),
    )
    s.views.append(image_view)
    s.check("SME is active with the C-bit from CPUID", kernel.me_mask == 1 << (ebx & 0x3F))
    s.check("CR3 carries the C-bit (page tables are encrypted)", core.cr3 & kernel.me_mask)
    s.check("the CPU reads the kernel image in plaintext", image_view.cpu_reads == banner)
    s.check("DRAM holds the kernel image as ciphertext", image_view.dram_holds != banner)
    copies = dump.find(banner)
    in_buffer = [pa for pa in copies if 0 <= pa - report.copy_buffer_pa < 2 << 20]
    s.facts.append(
        (
            "plaintext copies in DRAM",
            ", ".join(f"{pa:#x}" for pa in copies) + " (the work area's copy buffer: Linux "
            "leaves the last 2 MiB chunk there; the image is public anyway)",
        )
    )
    s.check(
        "the only plaintext copy left is in the work area's copy buffer",
        copies and copies == in_buffer,
    )
    yield s

    # 3. The SEV platform, and the guest owner checking who it is.
    yield Working("the guest owner authenticates the platform")
    sev = SevDevice(kernel, platform.mailbox)
    probe = sev.probe()
    system = HostSystem(platform, kernel, sev)
    yield _authenticate_step(system, probe.ok)

    # 4. A secret through C=1, a public string through C=0.
    secret_va, public_va = _write_secret_and_public(kernel)
    s = Step(
        "Write a secret through a C=1 mapping and a public string through a C=0 mapping",
        "Caches hold plaintext: encryption happens in the memory controller, on the way to "
        "DRAM. Right after the stores the data is only in the cache, so DRAM still holds "
        "what was there before (here: never-written zeros).",
    )
    before = _view("secret, before write-back", "C=1", kernel, dump, secret_va, len(SECRET))
    s.views.append(before)
    s.check("before write-back, DRAM does not hold the secret yet", before.dram_holds != SECRET)
    yield s

    # 5. Write back and compare.
    yield Working("flushing the caches and searching the DRAM dump")
    written = core.wbinvd()
    secret_view = _view("secret", "C=1", kernel, dump, secret_va, len(SECRET))
    public_view = _view("public string", "C=0", kernel, dump, public_va, len(PUBLIC))
    s = Step(
        "Flush the caches (WBINVD) and compare what the CPU reads with what DRAM holds",
        "The CPU reads both strings in plaintext. In DRAM, the C=1 page is ciphertext "
        "(AES with the host key, tweaked by the physical address); the C=0 page is stored "
        "as it is. A physical attacker's dump reads the public string, not the secret.",
        facts=[("dirty lines written back", str(written))],
        views=[secret_view, public_view],
    )
    s.check("the CPU reads the secret", secret_view.cpu_reads == SECRET)
    s.check("DRAM holds the secret only as ciphertext", secret_view.dram_holds != SECRET)
    s.check("a search of the whole DRAM dump does not find the secret", not dump.find(SECRET))
    s.check("the CPU reads the public string", public_view.cpu_reads == PUBLIC)
    s.check("DRAM holds the public string in plaintext", public_view.dram_holds == PUBLIC)
    s.check(
        "the dump finds the public string at its address",
        dump.find(PUBLIC) == [public_view.physical_address],
    )
    yield s

    # 6. The C-bit selects a key; it does not convert data.
    kernel.set_memory_decrypted(secret_va, 1)
    flipped = _view("secret page, now C=0", "C=0", kernel, dump, secret_va, len(SECRET))
    s = Step(
        "Clear the C-bit of the secret page (set_memory_decrypted)",
        "Changing the C-bit changes which key the memory controller uses, not the bytes in "
        "DRAM: the CPU now reads the stored ciphertext. This is why Linux only converts "
        "buffers whose content it will rewrite, and why a host mapping a page without the "
        "C-bit sees only ciphertext.",
        views=[flipped],
    )
    s.check(
        "through C=0 the CPU reads the ciphertext, not the secret",
        flipped.cpu_reads == secret_view.dram_holds,
    )
    yield s


def _authenticate_step(system: HostSystem, probed: bool) -> Step:
    sev = system.sev
    chain = system.export_chain()
    report = verify_chain(chain, choose_root(chain, "sim", system.data_dir))
    # A malicious host swaps in a PEK of its own choosing: one changed byte of its key.
    raw = bytearray(chain.pek.raw)
    raw[0x20] ^= 0x01
    forged = SevChain(chain.pdh, SevCert.parse(bytes(raw)), chain.oca, chain.cek)
    forged_report = verify_chain(forged, choose_root(chain, "sim", system.data_dir))
    real_amd = verify_chain(chain, builtin_root(system.machine.profile.name))
    major, minor, build = sev.api_version or (0, 0, 0)
    failure = forged_report.first_failure()
    s = Step(
        "The guest owner authenticates the platform",
        "The host's SEV driver initialises the AMD Secure Processor through its mailbox "
        "(INIT, WBINVD on every core, DF_FLUSH) and exports the certificate chain. The guest "
        "owner checks it: the chip's CEK is signed by AMD's ASK (from the key distribution "
        "service), the CEK and the owner's OCA sign the PEK, the PEK signs the PDH — the key "
        "the owner will use to send secrets to this chip and nobody else. Here the root is "
        "the simulator's AMD root; a simulated chip does not chain to AMD's real one.",
        facts=[
            ("firmware", f"SEV API {major}.{minor}, build {build}"),
            ("driver log", "; ".join(sev.log)),
            ("chip ID", system.chip_id().hex()[:32] + "..."),
            ("PDH certificate SHA-256", hashlib.sha256(chain.pdh.raw).hexdigest()[:32] + "..."),
            (
                "forged PEK",
                f"{failure.subject} {failure.check}: {failure.reason}" if failure else "accepted!",
            ),
        ],
    )
    s.check("the platform initialised through the mailbox", probed)
    s.check("every link of the chain verifies against the simulated AMD root", report.ok)
    s.check("a chain with a forged PEK is rejected", not forged_report.ok)
    s.check("the simulated chip does not chain to AMD's real ARK", not real_amd.ok)
    return s


def tsme_story(profile: MachineProfile) -> Story:
    yield Working("rebooting with Transparent SME")
    machine = Machine(profile)
    core = machine.cores[0]
    dump = ColdBootDump(machine)
    kernel = HostKernel(core, cmdline="mem_encrypt=on")
    kernel.boot()
    secret_va, public_va = _write_secret_and_public(kernel)
    core.wbinvd()
    secret_view = _view("secret", "C=1", kernel, dump, secret_va, len(SECRET))
    public_view = _view("public string", "C=0", kernel, dump, public_va, len(PUBLIC))
    s = Step(
        "Reboot with Transparent SME (BIOS option) and do the same",
        "With TSME the memory controller encrypts every DRAM access with the host key, "
        "whatever the C-bit says and without any help from the OS. Both pages are "
        "ciphertext in DRAM; the CPU still reads both in plaintext. (TSME and SME share "
        "the key, so the C-bit changes nothing.)",
        views=[secret_view, public_view],
    )
    s.check("the CPU reads the secret", secret_view.cpu_reads == SECRET)
    s.check("the CPU reads the public string", public_view.cpu_reads == PUBLIC)
    s.check("DRAM holds the public string only as ciphertext", public_view.dram_holds != PUBLIC)
    s.check(
        "a search of the whole DRAM dump finds neither string",
        not dump.find(SECRET) and not dump.find(PUBLIC),
    )
    s.check(
        "the kernel's own boot-time image is ciphertext in DRAM", not dump.find(kernel.image[:48])
    )
    yield s
