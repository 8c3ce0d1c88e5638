"""The host kernel: Linux's SME boot sequence and its page-attribute changes.

Host software, so it reaches the machine only as a host kernel can: through a core
(CPUID, MSRs, control registers, loads and stores through its own page tables) — never
through the memory controller or DRAM directly.

Boot (hardware.md §3.5; Linux arch/x86/mm/mem_encrypt_identity.c, mem_encrypt_boot.S):

1. The boot loader copies the kernel image to 16 MiB with paging off (plaintext), builds an
   identity map and enters long mode.
2. ``sme_enable``: CPUID 0x8000001F, SEV_STATUS, the hypervisor bit, SYSCFG[23] and the
   ``mem_encrypt=`` command-line option decide whether SME is used; the C-bit becomes the
   kernel's ``me_mask``.
3. The kernel's own page tables are built inside the image, with ``me_mask`` in every
   entry, while still running unencrypted (Linux's __startup_64).
4. ``sme_encrypt_kernel`` encrypts the image *in place*: new page tables in a work area map
   the image twice — encrypted, and decrypted through a write-protect (PAT PA5 = WP) alias
   so no dirty plaintext line can exist — then WBINVD, then 2 MiB at a time: decrypted
   alias -> intermediate buffer -> encrypted mapping.
5. CR3 is loaded with the kernel's tables and the C-bit: from here on every access of the
   kernel is encrypted with the host key.

Afterwards the kernel addresses all DRAM through its direct map at ``PAGE_OFFSET``, and
``set_memory_encrypted/decrypted`` change the C-bit of direct-map pages with the steps of
hardware.md §4.3 (Linux __set_memory_enc_pgtable), including the cache flush that is
skipped on parts with HwEnforcedCacheCoh.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from sevsim.pagetables import PAGE_KERNEL, LinearWindow, PageTables
from sevsim.soc import msr
from sevsim.soc.core import Core
from sevsim.soc.cpuid import LEAF1_ECX_HYPERVISOR
from sevsim.soc.paging import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    CR4_PGE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    RW,
    A,
    D,
    P,
)

MiB = 1 << 20
PAGE_OFFSET = 0xFFFF_8880_0000_0000  # Linux's direct map base with 4-level paging
VMALLOC_START = 0xFFFF_C900_0000_0000  # where memremap() puts its mappings
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # Linux's kernel text mapping
KERNEL_PA = 16 * MiB  # CONFIG_PHYSICAL_START
BOOT_PGT_PA = 1 * MiB  # the boot loader's identity-map tables
SME_FLAGS = P | RW | A | D  # Linux's PMD_FLAGS_LARGE / PTE_FLAGS without PS and G
PAT_INDEX_WP = 5  # sme_encrypt_execute sets PAT entry PA5 to write-protect
MEMTYPE_WP = 5

DEFAULT_IMAGE_BANNER = b"Linux version 6.12.0-sevsim (model kernel) #1 SMP PREEMPT_DYNAMIC\n"


def default_kernel_image(size: int = 256 * 1024) -> bytes:
    """A recognisable stand-in for vmlinux: text anyone can spot in a memory dump."""
    body = DEFAULT_IMAGE_BANNER
    line = 0
    while len(body) < size:
        body += (
            f"[{line:06d}] kernel text and data: mem_encrypt, sme_me_mask, cc_platform\n".encode()
        )
        line += 1
    return body[:size]


@dataclass
class SmeDecision:
    active: bool
    me_mask: int
    reason: str


@dataclass
class BootReport:
    sme: SmeDecision
    kernel_pa: int
    kernel_len: int  # the encrypted range: the image and its tables, 2 MiB aligned
    image_len: int
    workarea_pa: int
    copy_buffer_pa: int  # the 2 MiB intermediate buffer: keeps the last chunk in plaintext
    log: list[str] = field(default_factory=list)


class HostKernel:
    def __init__(
        self, core: Core, cmdline: str = "mem_encrypt=on", image: bytes | None = None
    ) -> None:
        self.core = core
        self.cmdline = cmdline
        self.image = default_kernel_image() if image is None else image
        self.log: list[str] = []
        self.me_mask = 0
        self.tables: PageTables | None = None
        self._next_free = 0
        self._free: list[int] = []
        self._zone_lock = threading.RLock()  # the page allocator serves many threads
        self._vmalloc_next = VMALLOC_START
        self._dram_size = core.machine.dram.size  # the E820 map the firmware hands over
        self.report: BootReport | None = None

    @property
    def sme_active(self) -> bool:
        return bool(self.me_mask)

    def _print(self, message: str) -> None:
        self.log.append(message)

    # ---- boot --------------------------------------------------------------------------
    def boot(self, skip_wbinvd: bool = False) -> BootReport:
        """Boot to a running kernel. ``skip_wbinvd`` omits the WBINVD before the in-place
        encryption, to show what it protects against (never set it otherwise)."""
        core = self.core
        image_len = _align(len(self.image), PAGE_4K)
        pgt_pa = KERNEL_PA + image_len
        # Room in the image for the kernel's own tables: a PML4, one PDPT per 512 GiB of
        # direct map, and a PDPT and a PD for the kernel text mapping.
        pgt_pages = 3 + -(-self._dram_size // (512 * PAGE_1G))
        kernel_end = _align(pgt_pa + pgt_pages * PAGE_4K, PAGE_2M)
        workarea_pa = kernel_end
        self._load_and_enter_long_mode()
        sme = self.sme_enable()
        self.me_mask = sme.me_mask if sme.active else 0
        self._print(sme.reason)

        # The kernel's page tables, inside the image, built through the identity map.
        image_pgt = iter(range(pgt_pa, pgt_pa + pgt_pages * PAGE_4K, PAGE_4K))
        tables = PageTables(
            LinearWindow(core, 0),
            lambda: next(image_pgt),
            me_mask=self.me_mask,
            encrypted_tables=True,
        )
        for base in range(0, self._dram_size, PAGE_1G):
            tables.map(PAGE_OFFSET + base, base, PAGE_1G, PAGE_KERNEL, encrypted=self.sme_active)
        tables.map_range(
            START_KERNEL_MAP, KERNEL_PA, kernel_end - KERNEL_PA, SME_FLAGS, self.sme_active
        )

        if self.sme_active:
            workarea_end = self._sme_encrypt_kernel(KERNEL_PA, kernel_end, workarea_pa, skip_wbinvd)
        else:
            workarea_end = workarea_pa
        core.write_cr3(tables.cr3())
        tables.mem = LinearWindow(core, PAGE_OFFSET)  # from now on: through the direct map
        tables.alloc_page = self.alloc_frame
        self.tables = tables
        self._next_free = workarea_end
        self._print(
            f"Kernel running with CR3 {core.cr3:#x}"
            + (" (C-bit set: page tables and memory encrypted)" if self.sme_active else "")
        )
        self.report = BootReport(
            sme,
            KERNEL_PA,
            kernel_end - KERNEL_PA,
            len(self.image),
            workarea_pa,
            workarea_pa + 2 * PAGE_4K,
            self.log,
        )
        return self.report

    def _load_and_enter_long_mode(self) -> None:
        """What the boot loader and the decompressor do: copy the image with paging off,
        identity-map low memory with 1 GiB pages, and switch to long mode."""
        core = self.core
        core.write_cr0(core.cr0 | CR0_PE)
        core.write(KERNEL_PA, self.image)
        boot_pages = iter(range(BOOT_PGT_PA, KERNEL_PA, PAGE_4K))
        boot = PageTables(LinearWindow(core, 0), lambda: next(boot_pages))
        for base in range(0, min(self._dram_size, 512 * PAGE_1G), PAGE_1G):
            boot.map(base, base, PAGE_1G, SME_FLAGS)
        core.write_cr4(core.cr4 | CR4_PAE | CR4_PGE)
        core.wrmsr(msr.EFER, core.rdmsr(msr.EFER) | EFER_LME | EFER_NXE)
        core.write_cr3(boot.cr3())
        core.write_cr0(core.cr0 | CR0_PG | CR0_WP)
        self._print(f"Boot loader: kernel image at {KERNEL_PA:#x}, long mode, identity map")

    def sme_enable(self) -> SmeDecision:
        """Linux's sme_enable(): may this kernel use SME, and with which C-bit?"""
        core = self.core
        if core.cpuid(0x8000_0000)[0] < 0x8000_001F:
            return SmeDecision(False, 0, "SME: no CPUID leaf 0x8000001F")
        eax, ebx, _, _ = core.cpuid(0x8000_001F)
        if not eax & 0b11:
            return SmeDecision(False, 0, "SME: the CPU supports neither SME nor SEV")
        me_mask = 1 << (ebx & 0x3F)
        if core.rdmsr(msr.SEV_STATUS) & 1:
            return SmeDecision(True, me_mask, "SEV guest: memory encryption is always on")
        if core.cpuid(1)[2] & LEAF1_ECX_HYPERVISOR:
            return SmeDecision(False, 0, "SME: not used under a hypervisor")
        if not core.rdmsr(msr.SYSCFG) & msr.SYSCFG_MEM_ENCRYPT:
            return SmeDecision(
                False, 0, "SME: disabled by the BIOS (SYSCFG[23] MemEncryptionModEn clear)"
            )
        option = cmdline_option(self.cmdline, "mem_encrypt")
        if option == "on":
            return SmeDecision(
                True, me_mask, f"AMD Memory Encryption Features active: SME (C-bit {ebx & 0x3F})"
            )
        if option == "off":
            return SmeDecision(False, 0, "SME: available but turned off (mem_encrypt=off)")
        return SmeDecision(False, 0, "SME: available but not requested (no mem_encrypt=on)")

    def _sme_encrypt_kernel(
        self, kernel_start: int, kernel_end: int, workarea: int, skip_wbinvd: bool
    ) -> int:
        core = self.core
        kernel_len = kernel_end - kernel_start
        # Work area: stack page, routine page, 2 MiB intermediate buffer, then page tables.
        buffer_pa = workarea + 2 * PAGE_4K
        execute_end = buffer_pa + PAGE_2M
        table_pages = iter(range(execute_end, execute_end + 64 * PAGE_4K, PAGE_4K))
        workarea_end = _align(execute_end + 64 * PAGE_4K, PAGE_2M)

        # New tables (in the work area, unencrypted: _KERNPG_TABLE_NOENC).
        enc = PageTables(LinearWindow(core, 0), lambda: next(table_pages), me_mask=self.me_mask)
        decrypted_base = (((workarea_end >> 39) + 1) & 0x1FF) << 39  # the next PGD slot
        enc.map_range(kernel_start, kernel_start, kernel_len, SME_FLAGS, encrypted=True)
        enc.map_range(
            kernel_start + decrypted_base,
            kernel_start,
            kernel_len,
            SME_FLAGS,
            pat_index=PAT_INDEX_WP,
        )
        for va in (workarea, workarea + decrypted_base):
            enc.map_range(va, workarea, workarea_end - workarea, SME_FLAGS)

        # sme_encrypt_execute / __enc_copy.
        core.write(workarea + PAGE_4K, b"__enc_copy")  # the routine, copied out of the kernel
        core.write_cr3(enc.cr3())
        cr4 = core.cr4
        core.write_cr4(cr4 & ~CR4_PGE)  # flush global TLB entries
        core.write_cr4(cr4)
        saved_pat = core.rdmsr(msr.PAT)
        core.wrmsr(msr.PAT, (saved_pat & ~(0xFF << 40)) | (MEMTYPE_WP << 40))
        if not skip_wbinvd:
            core.wbinvd()
        for off in range(0, kernel_len, PAGE_2M):
            n = min(PAGE_2M, kernel_len - off)
            core.copy(buffer_pa, kernel_start + decrypted_base + off, n)
            core.copy(kernel_start + off, buffer_pa, n)
        core.wrmsr(msr.PAT, saved_pat)

        enc.clear_top_entries(kernel_start + decrypted_base, kernel_len)
        enc.clear_top_entries(workarea + decrypted_base, workarea_end - workarea)
        core.write_cr3(core.cr3)
        self._print(
            f"Kernel encrypted in place: {kernel_len >> 20} MiB at {kernel_start:#x} "
            f"(WP alias at {kernel_start + decrypted_base:#x}"
            + (", WBINVD skipped" if skip_wbinvd else "")
            + ")"
        )
        return workarea_end

    # ---- CPUs -------------------------------------------------------------------------------
    def cpu(self, index: int) -> Core:
        """Core ``index`` running this kernel. A secondary core is brought online on first
        use the way the AP trampoline leaves it: long mode, the kernel's CR3 and CR4."""
        if self.tables is None:
            raise RuntimeError("the kernel has not booted")
        core = self.core.machine.cores[index]
        if core is not self.core and not core.cr0 & CR0_PG:
            bsp = self.core
            core.write_cr0(core.cr0 | CR0_PE)
            core.write_cr4(bsp.cr4)
            core.wrmsr(msr.PAT, bsp.rdmsr(msr.PAT))
            core.wrmsr(msr.EFER, bsp.rdmsr(msr.EFER) & ~EFER_LMA)
            core.write_cr3(bsp.cr3)
            core.write_cr0(bsp.cr0)
        return core

    # ---- memory -------------------------------------------------------------------------
    def va(self, pa: int) -> int:
        return PAGE_OFFSET + pa

    def pa(self, va: int) -> int:
        if not PAGE_OFFSET <= va < PAGE_OFFSET + self._dram_size:
            raise ValueError(f"{va:#x} is not in the direct map")
        return va - PAGE_OFFSET

    def alloc_frame(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next_free + PAGE_4K > self._dram_size:
            raise MemoryError("out of physical memory")
        pa = self._next_free
        self._next_free += PAGE_4K
        return pa

    def alloc_pages(self, npages: int = 1, zero: bool = True, align: int = PAGE_4K) -> int:
        """Physically contiguous pages, ``align``-aligned (e.g. 2 MiB for memory that is to
        be mapped with huge pages); returns their direct-map address."""
        if self.tables is None:
            raise RuntimeError("the kernel has not booted")
        with self._zone_lock:
            if self._free and npages == 1 and align == PAGE_4K:
                pa = self._free.pop()
            elif (run := self._take_free_run(npages, align)) is not None:
                pa = run  # freed memory first, as the buddy allocator would
            else:
                start = _align(self._next_free, align)
                if start + npages * PAGE_4K > self._dram_size:
                    raise MemoryError("out of physical memory")
                self._free.extend(range(self._next_free, start, PAGE_4K))  # the alignment gap
                pa = start
                self._next_free = start + npages * PAGE_4K
        va = self.va(pa)
        if zero:
            self.core.write(va, bytes(npages * PAGE_4K))
        return va

    def memremap(self, pa: int, n: int, decrypted: bool = False) -> int:
        """Linux memremap(): a further kernel mapping of [pa, pa+n), in 4 KiB pages. With
        ``decrypted`` (MEMREMAP_DEC) the entries lack the C-bit, so accesses move the bytes
        as DRAM holds them: how a kernel reaches memory a guest or the firmware encrypted,
        and what a hypervisor that wants raw ciphertext does."""
        if self.tables is None:
            raise RuntimeError("the kernel has not booted")
        start = pa & ~(PAGE_4K - 1)
        npages = -(-(pa + n - start) // PAGE_4K)
        va = self._vmalloc_next
        self._vmalloc_next += (npages + 1) * PAGE_4K  # a guard page after each mapping
        encrypted = self.sme_active and not decrypted
        for i in range(npages):
            self.tables.map(va + i * PAGE_4K, start + i * PAGE_4K, PAGE_4K, PAGE_KERNEL, encrypted)
        return va + (pa - start)

    def _take_free_run(self, npages: int, align: int) -> int | None:
        """The lowest ``align``-aligned run of ``npages`` freed pages, taken; or None."""
        if len(self._free) < npages:
            return None
        pages = sorted(self._free)
        run_start = prev = pages[0]
        for pa in [*pages[1:], None]:
            if pa is not None and pa == prev + PAGE_4K:
                prev = pa
                continue
            start = _align(run_start, align)
            if start + npages * PAGE_4K <= prev + PAGE_4K:
                end = start + npages * PAGE_4K
                self._free = [p for p in self._free if not start <= p < end]
                return start
            if pa is not None:
                run_start = prev = pa
        return None

    def free_bytes(self) -> int:
        """Memory the page allocator can still hand out (/proc/meminfo's MemFree)."""
        with self._zone_lock:
            return self._dram_size - self._next_free + len(self._free) * PAGE_4K

    def free_pages(self, va: int, npages: int = 1) -> None:
        pa = self.pa(va)
        with self._zone_lock:
            self._free.extend(range(pa, pa + npages * PAGE_4K, PAGE_4K))

    def read(self, va: int, n: int) -> bytes:
        return self.core.read(va, n)

    def copy(self, dst_va: int, src_va: int, n: int) -> None:
        """memcpy through the kernel's mappings (cached, like REP MOVSB)."""
        self.core.copy(dst_va, src_va, n)

    def read_stream(self, va: int, n: int) -> bytes:
        """A bulk copy out with non-temporal loads (no cache lines allocated)."""
        return self.core.read_stream(va, n)

    def read_stream_into(self, va: int, out: np.ndarray) -> None:
        """``read_stream`` into a uint8 buffer of the caller's."""
        self.core.read_stream_into(va, out)

    def write_stream(self, va: int, data: bytes) -> None:
        """A bulk copy in with non-temporal stores (straight to DRAM, no dirty lines)."""
        self.core.write_stream(va, data)

    def wbinvd_on_all_cpus(self) -> None:
        """Linux wbinvd_on_all_cpus(): the kernel runs WBINVD on every core."""
        for core in self.core.machine.cores:
            core.wbinvd()

    def write(self, va: int, data: bytes) -> None:
        self.core.write(va, data)

    # ---- page encryption attribute (hardware.md §4.3) ---------------------------------------
    def set_memory_decrypted(self, va: int, npages: int, skip_cache_flush: bool = False) -> None:
        self._set_memory_enc(va, npages, False, skip_cache_flush)

    def set_memory_encrypted(self, va: int, npages: int, skip_cache_flush: bool = False) -> None:
        self._set_memory_enc(va, npages, True, skip_cache_flush)

    def _set_memory_enc(self, va: int, npages: int, enc: bool, skip_cache_flush: bool) -> None:
        """Linux __set_memory_enc_pgtable. The data is *not* converted: after the change the
        old bytes read back as garbage, so callers only convert buffers they will rewrite.
        ``skip_cache_flush`` omits step 2, to show the corruption it prevents."""
        if self.tables is None:
            raise RuntimeError("the kernel has not booted")
        if not self.sme_active:
            return  # Linux: nothing to do when memory encryption is not active
        if va % PAGE_4K:
            raise ValueError(f"misaligned address {va:#x}")
        core = self.core
        end = va + npages * PAGE_4K
        pages = range(va, end, PAGE_4K)
        # 1. Other mappings of these pages: the model kernel has none besides the direct
        #    map (no highmem kmaps, no vmalloc aliases), so there is nothing to unmap.
        # 2. Without HwEnforcedCacheCoh, write the old-domain lines out through the old
        #    mapping before the attribute changes.
        coherent = bool(core.cpuid(0x8000_001F)[0] >> 10 & 1)
        if not coherent and not skip_cache_flush:
            core.clflush_range(va, end - va)
            self._flush_tlb(pages)
        # 3. One CPA pass: split large pages that are only partly converted, clear PRESENT
        #    and flip the C-bit.
        entries = []
        while va < end:
            leaf = self.tables.leaf_within(va, end)
            entry = (leaf.entry & ~P) & ~self.me_mask | (self.me_mask if enc else 0)
            self.tables.write_entry(leaf.entry_pa, entry)
            entries.append((leaf.entry_pa, entry))
            va += leaf.size
        # 4. Flush the TLB.
        self._flush_tlb(pages)
        # 5. enc_status_change_finish: nothing to tell anyone on an SME host.
        # 6. Present again.
        for entry_pa, entry in entries:
            self.tables.write_entry(entry_pa, entry | P)
        self._flush_tlb(pages)

    def _flush_tlb(self, pages: range) -> None:
        if len(pages) > 32:
            # flush_tlb_kernel_range falls back to a full flush: the direct map is global,
            # so that is __flush_tlb_all's CR4.PGE toggle, not a CR3 reload.
            cr4 = self.core.cr4
            self.core.write_cr4(cr4 & ~CR4_PGE)
            self.core.write_cr4(cr4)
        else:
            for page in pages:
                self.core.invlpg(page)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def cmdline_option(cmdline: str, name: str) -> str | None:
    value = None
    for word in cmdline.split():
        key, _, arg = word.partition("=")
        if key == name:
            value = arg
    return value
