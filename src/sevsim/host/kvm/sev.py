"""KVM's SEV support (Linux arch/x86/kvm/svm/sev.c): the SEV ASIDs, firmware commands
issued through /dev/sev, and a guest's launch, launch secret, attestation, debug and
teardown. Migration (KVM_SEV_SEND_* / KVM_SEV_RECEIVE_*) is in ``sev_migration``.

* The guest's firmware context is made with LAUNCH_START and bound to an ASID with ACTIVATE
  (``sev_bind_asid``); the launch image is encrypted with LAUNCH_UPDATE_DATA; teardown is
  DEACTIVATE then DECOMMISSION.
* SEV ASIDs come from ``SevAsids``, which recycles lazily as KVM does: a freed ASID waits in
  a reclaim set, and only when the pool is empty does KVM run WBINVD on every core and
  DF_FLUSH, after which the reclaimed ASIDs are free.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sevsim.api import commands as cmd
from sevsim.api import policy as pol
from sevsim.api.commands import Command
from sevsim.api.status import Status
from sevsim.api.vmsa import VMSA_SIZE
from sevsim.host.kvm.sev_es import sev_es_sync_vmsa
from sevsim.host.kvm.uapi import KvmError
from sevsim.soc.paging import PAGE_4K

if TYPE_CHECKING:
    from sevsim.host.kernel import HostKernel
    from sevsim.host.kvm.kvm_main import Kvm
    from sevsim.host.kvm.svm import Vcpu
    from sevsim.host.sev import SevDevice


class SevAsids:
    """KVM's SEV ASID bitmaps: in use, and freed-but-not-yet-flushed (the reclaim set)."""

    def __init__(self, min_sev_asid: int, max_sev_asid: int, flush: Callable[[], None]) -> None:
        self.min_sev_asid = min_sev_asid
        self.max_sev_asid = max_sev_asid
        self._flush = flush
        self.used: set[int] = set()
        self.reclaim: set[int] = set()
        self.flushes = 0
        self._lock = threading.Lock()  # sev_bitmap_lock: VMs come and go on many threads

    def range(self, es: bool) -> range:
        if es:
            return range(1, self.min_sev_asid)
        return range(self.min_sev_asid, self.max_sev_asid + 1)

    def new(self, es: bool = False) -> int:
        """sev_asid_new: the lowest free ASID; when none is free, recycle once and retry."""
        with self._lock:
            return self._new(es)

    def _new(self, es: bool) -> int:
        candidates = self.range(es)
        for attempt in range(2):
            asid = next((a for a in candidates if a not in self.used), None)
            if asid is not None:
                self.used.add(asid)
                return asid
            if attempt == 0 and self.reclaim & set(candidates):
                self._recycle()
        kind = "SEV-ES" if es else "SEV"
        raise KvmError(f"no free {kind} ASID ({len(candidates)} in all)", err=errno.EBUSY)

    def _recycle(self) -> None:
        """__sev_recycle_asids: WBINVD on every core and DF_FLUSH, then the reclaimed ASIDs
        are free again (the firmware has moved them from dirty to clean)."""
        self._flush()
        self.flushes += 1
        self.used -= self.reclaim
        self.reclaim.clear()

    def free(self, asid: int) -> None:
        """sev_asid_free: the ASID stays unavailable until the next recycle."""
        with self._lock:
            self.reclaim.add(asid)


class KvmSev:
    """The host side of KVM's SEV support (mixed into ``Kvm``): firmware commands through
    /dev/sev, and the ASID flush that recycles the reclaimed ASIDs."""

    kernel: HostKernel
    sev: SevDevice | None
    log: list[str]

    def _flush_asids(self) -> None:
        """sev_flush_asids: WBINVD on every core, then DF_FLUSH."""
        self.kernel.wbinvd_on_all_cpus()
        status = self.sev_cmd(Command.DF_FLUSH)
        self.log.append(f"ASID pool empty: WBINVD on all cores, DF_FLUSH → {status.name}")
        if status != Status.SUCCESS:
            raise KvmError("DF_FLUSH", status)

    def sev_cmd(self, command: Command, **fields: Any) -> Status:
        """sev_issue_cmd: one firmware command; returns its status (fields updated in place
        are read back with ``sev_cmd_out``)."""
        return self._issue(command, fields)[0]

    def sev_cmd_out(self, command: Command, **fields: Any) -> tuple[Status, Any]:
        status, out = self._issue(command, fields)
        layout = cmd.BUFFERS.get(command)
        return status, layout.parse(out) if layout is not None and out else None

    def _issue(self, command: Command, fields: dict[str, Any]) -> tuple[Status, bytes]:
        if self.sev is None:
            raise KvmError("SEV is not available on this host", err=errno.ENODEV)
        layout = cmd.BUFFERS.get(command)
        ret, status, out = self.sev.do_cmd(command, layout.build(**fields) if layout else None)
        if ret == -errno.ETIMEDOUT:
            raise KvmError(f"{command.name}: the PSP did not answer", err=errno.ETIMEDOUT)
        return status, out


class SevGuest:
    """KVM_SEV_* commands for one guest (mixed into ``Vm``): launch, launch secret,
    attestation, debug, teardown."""

    kvm: Kvm
    kernel: HostKernel
    sev: bool
    handle: int
    policy: int
    asid: int
    vcpus: list[Vcpu]
    _hva_of: Callable[..., int]
    spa: Callable[[int], int]
    # KVM_SEV_INIT2 (Linux >= 6.10) puts the x87/SSE reset state into the VMSA; a VM made
    # with the older KVM_SEV_ES_INIT does not (sev-api.md §8.4). The VMM may clear it.
    vmsa_fpu_state = True

    def sev_launch_start(
        self, policy: int, godh_cert: bytes | None = None, session: bytes | None = None
    ) -> int:
        """KVM_SEV_LAUNCH_START: LAUNCH_START, then ACTIVATE with the VM's ASID (sev_bind_asid)."""
        if not self.sev:
            raise KvmError("not an SEV guest", err=errno.ENOTTY)
        kernel, sev = self.kernel, self.kvm.sev
        assert sev is not None
        bufs = []
        fields = {"handle": 0, "policy": policy}
        if godh_cert is not None:
            for name, data in (("dh_cert", godh_cert), ("session", session or b"")):
                va = kernel.alloc_pages(max(1, -(-len(data) // PAGE_4K)))
                kernel.write(va, data)
                bufs.append((va, len(data)))
                fields[f"{name}_paddr"] = sev.psp_pa(va)
                fields[f"{name}_len"] = len(data)
        try:
            status, out = self.kvm.sev_cmd_out(Command.LAUNCH_START, **fields)
        finally:
            for va, n in bufs:
                kernel.free_pages(va, max(1, -(-n // PAGE_4K)))
        if status != Status.SUCCESS:
            raise KvmError("LAUNCH_START", status)
        self.handle, self.policy = out.handle, policy
        self._bind_asid()
        return self.handle

    def _bind_asid(self) -> None:
        """sev_bind_asid: ACTIVATE the new guest on the VM's ASID (or give the handle up)."""
        status = self.kvm.sev_cmd(Command.ACTIVATE, handle=self.handle, asid=self.asid)
        if status != Status.SUCCESS:
            self.kvm.sev_cmd(Command.DECOMMISSION, handle=self.handle)
            self.handle = 0
            raise KvmError(f"ACTIVATE of ASID {self.asid}", status)

    def sev_launch_update_data(self, gpa: int, length: int) -> None:
        """KVM_SEV_LAUNCH_UPDATE_DATA: flush the pages (unless the part keeps the caches
        coherent across keys), then LAUNCH_UPDATE_DATA page by page."""
        hva = self._hva_of(gpa, length)  # pinned: contiguous host pages, one command
        if not self.kvm.sme_coherent:
            for line in range(hva & ~63, hva + length, 64):
                self.kernel.core.clflush(line)
        status = self.kvm.sev_cmd(
            Command.LAUNCH_UPDATE_DATA,
            handle=self.handle,
            paddr=self.spa(gpa) | self.kernel.me_mask,
            len=length,
        )
        if status != Status.SUCCESS:
            raise KvmError(f"LAUNCH_UPDATE_DATA at GPA {gpa:#x}", status)

    def sev_launch_update_vmsa(self) -> None:
        """KVM_SEV_LAUNCH_UPDATE_VMSA: for each vCPU in index order, sync its registers into
        its VMSA page, flush the page from the caches (unless coherent across keys), and
        have the firmware measure and encrypt it; from then on KVM cannot see the state."""
        if not self.sev or not self.policy & pol.PolicyFlag.ES:
            raise KvmError("not an SEV-ES guest", err=errno.ENOTTY)
        for vcpu in sorted(self.vcpus, key=lambda v: v.index):
            sev_es_sync_vmsa(vcpu, self.vmsa_fpu_state)
            if not self.kvm.sme_coherent:
                for line in range(vcpu.vmsa_va, vcpu.vmsa_va + VMSA_SIZE, 64):
                    self.kernel.core.clflush(line)
            status = self.kvm.sev_cmd(
                Command.LAUNCH_UPDATE_VMSA,
                handle=self.handle,
                paddr=vcpu.vmsa_pa | self.kernel.me_mask,
                len=VMSA_SIZE,
            )
            if status != Status.SUCCESS:
                raise KvmError(f"LAUNCH_UPDATE_VMSA of vCPU {vcpu.index}", status)
            vcpu.guest_state_protected = True

    def sev_launch_measure(self) -> bytes:
        """KVM_SEV_LAUNCH_MEASURE: MEASURE(32) || MNONCE(16)."""
        kernel = self.kernel
        va = kernel.alloc_pages(1)
        try:
            status, _ = self.kvm.sev_cmd_out(
                Command.LAUNCH_MEASURE,
                handle=self.handle,
                measure_paddr=self.kvm.sev.psp_pa(va),
                measure_len=48,
            )
            if status != Status.SUCCESS:
                raise KvmError("LAUNCH_MEASURE", status)
            return kernel.read(va, 48)
        finally:
            kernel.free_pages(va)

    def _kernel_buffer(self, data: bytes) -> tuple[int, int]:
        """Copy ioctl data into a kernel buffer (psp_copy_user_blob): (va, pages)."""
        pages = max(1, -(-len(data) // PAGE_4K))
        va = self.kernel.alloc_pages(pages)
        self.kernel.write(va, data)
        return va, pages

    def sev_launch_secret(self, header: bytes, payload: bytes, gpa: int) -> None:
        """KVM_SEV_LAUNCH_SECRET: the packet goes to the firmware from kernel buffers; the
        target is the guest page's host address with the C-bit (sev_me_mask)."""
        hva = self._hva_of(gpa, len(payload))  # pins (populates) the guest pages
        if not self.kvm.sme_coherent:
            for line in range(hva & ~63, hva + len(payload), 64):
                self.kernel.core.clflush(line)
        buffers = [self._kernel_buffer(header), self._kernel_buffer(payload)]
        psp_pa = self.kvm.sev.psp_pa
        try:
            status = self.kvm.sev_cmd(
                Command.LAUNCH_SECRET,
                handle=self.handle,
                hdr_paddr=psp_pa(buffers[0][0]),
                hdr_len=len(header),
                guest_paddr=self.spa(gpa) | self.kernel.me_mask,
                guest_len=len(payload),
                trans_paddr=psp_pa(buffers[1][0]),
                trans_len=len(payload),
            )
        finally:
            for va, pages in buffers:
                self.kernel.free_pages(va, pages)
        if status != Status.SUCCESS:
            raise KvmError("LAUNCH_SECRET", status)

    def sev_attestation_report(self, mnonce: bytes) -> bytes:
        """KVM_SEV_GET_ATTESTATION_REPORT: the PEK-signed report (0xD0 bytes)."""
        va = self.kernel.alloc_pages(1)
        try:
            status, _ = self.kvm.sev_cmd_out(
                Command.ATTESTATION,
                handle=self.handle,
                paddr=self.kvm.sev.psp_pa(va),
                mnonce=mnonce,
                len=cmd.ATTESTATION_REPORT.size,
            )
            if status != Status.SUCCESS:
                raise KvmError("ATTESTATION", status)
            return self.kernel.read(va, cmd.ATTESTATION_REPORT.size)
        finally:
            self.kernel.free_pages(va)

    def sev_dbg_decrypt(self, gpa: int, length: int) -> bytes:
        """KVM_SEV_DBG_DECRYPT (what a debugger attached to the VMM uses): in 16-byte
        granules, through a kernel bounce page."""
        start, end = gpa & ~15, (gpa + length + 15) & ~15
        va = self.kernel.alloc_pages(max(1, -(-(end - start) // PAGE_4K)))
        try:
            self._hva_of(start, end - start)
            status = self.kvm.sev_cmd(
                Command.DBG_DECRYPT,
                handle=self.handle,
                src_paddr=self.spa(start) | self.kernel.me_mask,
                dst_paddr=self.kvm.sev.psp_pa(va),
                len=end - start,
            )
            if status != Status.SUCCESS:
                raise KvmError("DBG_DECRYPT", status)
            return self.kernel.read(va + gpa - start, length)
        finally:
            self.kernel.free_pages(va, max(1, -(-(end - start) // PAGE_4K)))

    def sev_dbg_encrypt(self, gpa: int, data: bytes) -> None:
        """KVM_SEV_DBG_ENCRYPT: the firmware encrypts host data into the guest's memory with
        the guest's key, in 16-byte granules; a partial granule is decrypted first and
        merged (Linux __sev_dbg_encrypt_user)."""
        start, end = gpa & ~15, (gpa + len(data) + 15) & ~15
        if start != gpa or end != gpa + len(data):
            whole = bytearray(self.sev_dbg_decrypt(start, end - start))
            whole[gpa - start : gpa - start + len(data)] = data
            data = bytes(whole)
        pages = max(1, -(-(end - start) // PAGE_4K))
        va = self.kernel.alloc_pages(pages)
        try:
            self.kernel.write(va, data)
            self._hva_of(start, end - start)
            status = self.kvm.sev_cmd(
                Command.DBG_ENCRYPT,
                handle=self.handle,
                src_paddr=self.kvm.sev.psp_pa(va),
                dst_paddr=self.spa(start) | self.kernel.me_mask,
                len=end - start,
            )
            if status != Status.SUCCESS:
                raise KvmError("DBG_ENCRYPT", status)
        finally:
            self.kernel.free_pages(va, pages)

    def sev_launch_finish(self) -> None:
        status = self.kvm.sev_cmd(Command.LAUNCH_FINISH, handle=self.handle)
        if status != Status.SUCCESS:
            raise KvmError("LAUNCH_FINISH", status)

    def sev_guest_status(self) -> Any:
        status, out = self.kvm.sev_cmd_out(Command.GUEST_STATUS, handle=self.handle)
        if status != Status.SUCCESS:
            raise KvmError("GUEST_STATUS", status)
        return out

    def _sev_vm_destroy(self) -> None:
        """sev_vm_destroy: WBINVD on every core (no guest-tagged line may outlive the pages;
        CLFLUSH cannot do this), DEACTIVATE, DECOMMISSION, the ASID to the reclaim set."""
        self.kernel.wbinvd_on_all_cpus()
        if self.handle:
            status = self.kvm.sev_cmd(Command.DEACTIVATE, handle=self.handle)
            if status not in (Status.SUCCESS, Status.INACTIVE):
                raise KvmError("DEACTIVATE", status)
            status = self.kvm.sev_cmd(Command.DECOMMISSION, handle=self.handle)
            if status != Status.SUCCESS:
                raise KvmError("DECOMMISSION", status)
        self.kvm.asids.free(self.asid)
