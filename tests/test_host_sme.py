"""The host kernel's SME sequences (hardware.md §3.5, §4.3): full mode with the in-place
kernel encryption, and per-range changes with set_memory_encrypted/decrypted."""

from __future__ import annotations

import pytest
from conftest import ALL_PROFILES, COHERENT, NON_COHERENT, make_machine

from sevsim.attacks.physical import ColdBootDump
from sevsim.host import HostKernel
from sevsim.host.kernel import KERNEL_PA, START_KERNEL_MAP
from sevsim.soc.cpuid import LEAF1_ECX_HYPERVISOR


def boot(name: str, cmdline: str = "mem_encrypt=on", **changes):
    m = make_machine(name, **changes)
    kernel = HostKernel(m.cores[0], cmdline=cmdline)
    report = kernel.boot()
    return m, kernel, report


@pytest.mark.parametrize("name", ALL_PROFILES)
def test_full_mode_encrypts_the_kernel_in_place(name):
    m, kernel, report = boot(name)
    core = m.cores[0]
    assert report.sme.active and kernel.me_mask == 1 << m.profile.cbit
    assert core.cr3 & kernel.me_mask  # the page tables themselves are encrypted
    image = kernel.image
    # The CPU sees the image, through the direct map and through the kernel text mapping.
    assert kernel.read(kernel.va(KERNEL_PA), 4096) == image[:4096]
    assert core.fetch(START_KERNEL_MAP + 8192, 64) == image[8192 : 8192 + 64]
    core.wbinvd()
    stored = m.dram.read(KERNEL_PA, len(image))
    assert stored != image
    assert stored[:64] not in image  # not a shifted copy either
    # The kernel's own page tables sit in the encrypted range and are ciphertext in DRAM.
    pml4_pa = core.cr3 & ~kernel.me_mask & ~0xFFF
    assert KERNEL_PA <= pml4_pa < KERNEL_PA + report.kernel_len
    entry = kernel.tables.read_entry(pml4_pa + 8 * 0x111)  # the direct map's PML4 slot
    assert entry & 1 and entry & kernel.me_mask
    assert m.dram.read(pml4_pa + 8 * 0x111, 8) != entry.to_bytes(8, "little")


@pytest.mark.parametrize("name", NON_COHERENT)
def test_in_place_encryption_leaves_no_dirty_plaintext_line_of_the_kernel(name):
    """WBINVD first, and the plaintext alias is write-protect: after the copy, no line of
    the kernel range can be written back in plaintext over the ciphertext."""
    m, kernel, report = boot(name)
    end = KERNEL_PA + report.kernel_len
    assert not [pa for pa, slot in m.cache.dirty_lines() if slot == 0 and KERNEL_PA <= pa < end]
    m.cores[0].wbinvd()
    assert kernel.read(kernel.va(KERNEL_PA), 256) == kernel.image[:256]


def test_the_copy_buffer_keeps_the_last_plaintext_chunk():
    """Linux's __enc_copy leaves the last 2 MiB chunk in the work area's intermediate
    buffer, outside the encrypted range; the model keeps that detail."""
    m, kernel, report = boot("milan")
    m.cores[0].wbinvd()
    hits = ColdBootDump(m).find(kernel.image[:64])
    assert hits == [report.copy_buffer_pa]


@pytest.mark.parametrize(
    ("cmdline", "changes", "reason"),
    [
        ("mem_encrypt=off", {}, "turned off"),
        ("quiet", {}, "not requested"),
        ("mem_encrypt=on", {"smee": False}, "disabled by the BIOS"),
    ],
)
def test_sme_enable_declines(cmdline, changes, reason):
    m, kernel, report = boot("milan", cmdline=cmdline, **changes)
    assert not report.sme.active and reason in report.sme.reason
    assert not m.cores[0].cr3 & m.cbit_mask
    m.cores[0].wbinvd()
    assert m.dram.read(KERNEL_PA, 256) == kernel.image[:256]  # nothing was encrypted


def test_sme_enable_declines_under_a_hypervisor(monkeypatch):
    m = make_machine("milan")
    core = m.cores[0]
    real = core.cpuid

    def cpuid_as_guest(leaf, subleaf=0):  # what a guest sees: CPUID 1 ECX[31] set
        regs = real(leaf, subleaf)
        return (regs[0], regs[1], regs[2] | LEAF1_ECX_HYPERVISOR, regs[3]) if leaf == 1 else regs

    monkeypatch.setattr(core, "cpuid", cpuid_as_guest)
    report = HostKernel(core).boot()
    assert not report.sme.active and "hypervisor" in report.sme.reason


def test_tsme_encrypts_even_a_kernel_without_sme():
    m, kernel, report = boot("rome", cmdline="mem_encrypt=off", tsme=True)
    assert not report.sme.active
    m.cores[0].wbinvd()
    assert not ColdBootDump(m).find(kernel.image[:64])
    assert kernel.read(kernel.va(KERNEL_PA), 64) == kernel.image[:64]


@pytest.mark.parametrize("name", ALL_PROFILES)
def test_set_memory_decrypted_and_encrypted(name):
    m, kernel, _ = boot(name)
    core = m.cores[0]
    va = kernel.alloc_pages(2)
    pa = kernel.pa(va)
    kernel.write(va, b"secret")
    core.wbinvd()
    ciphertext = m.dram.read(pa, 6)
    assert ciphertext != b"secret"
    kernel.set_memory_decrypted(va, 2)
    # The attribute changed, the data did not: the old bytes now read as stored.
    assert kernel.read(va, 6) == ciphertext
    assert kernel.tables.leaf(va).level == 1  # the 1 GiB direct-map page was split
    assert not kernel.tables.leaf(va).entry & kernel.me_mask
    kernel.write(va + 4096, b"shared with a device")
    core.wbinvd()
    assert m.dram.read(pa + 4096, 20) == b"shared with a device"
    # The neighbours of the split range are still encrypted and intact.
    neighbour = va + 2 * 4096
    kernel.write(neighbour, b"still private")
    core.wbinvd()
    assert m.dram.read(pa + 2 * 4096, 13) != b"still private"
    assert kernel.read(neighbour, 13) == b"still private"
    kernel.set_memory_encrypted(va, 2)
    kernel.write(va, b"private again")
    core.wbinvd()
    assert m.dram.read(pa, 13) != b"private again"
    assert kernel.read(va, 13) == b"private again"


def _skipped_flush(name: str, skip: bool) -> bytes:
    """Data written with C=1 is still dirty in the cache when the page is switched to C=0.
    New data is written through C=0 and flushed to DRAM (e.g. for a device); later the
    caches are written back."""
    m, kernel, _ = boot(name)
    core = m.cores[0]
    va = kernel.alloc_pages(1)
    kernel.write(va, b"old data, written encrypted".ljust(4096, b"."))
    kernel.set_memory_decrypted(va, 1, skip_cache_flush=skip)
    new = b"new data, written in plaintext".ljust(4096, b"!")
    kernel.write(va, new)
    for line in range(va, va + 4096, 64):
        core.clflush(line)
    core.wbinvd()
    return kernel.read(va, 4096), new


@pytest.mark.parametrize("name", NON_COHERENT)
def test_skipped_flush_corrupts_without_hw_coherency(name):
    got, new = _skipped_flush(name, skip=True)
    assert got != new  # the stale C=1 lines overwrote the new data with ciphertext
    got, new = _skipped_flush(name, skip=False)
    assert got == new  # Linux's flush prevents it


@pytest.mark.parametrize("name", COHERENT)
def test_skipped_flush_is_harmless_with_hw_coherency(name):
    got, new = _skipped_flush(name, skip=True)
    assert got == new


def test_set_memory_is_a_no_op_without_sme():
    m, kernel, _ = boot("milan", cmdline="mem_encrypt=off")
    va = kernel.alloc_pages(1)
    kernel.set_memory_encrypted(va, 1)
    kernel.write(va, b"plain")
    m.cores[0].wbinvd()
    assert m.dram.read(kernel.pa(va), 5) == b"plain"


def test_set_memory_refuses_a_misaligned_address():
    _, kernel, _ = boot("milan")
    with pytest.raises(ValueError):
        kernel.set_memory_decrypted(kernel.va(0x5000_0001), 1)


def test_alloc_pages_and_free():
    _, kernel, report = boot("milan")
    va = kernel.alloc_pages(3)
    assert kernel.pa(va) >= report.workarea_pa
    assert kernel.read(va, 3 * 4096) == bytes(3 * 4096)
    kernel.free_pages(va, 1)
    assert kernel.alloc_pages(1) == va
