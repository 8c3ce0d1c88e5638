"""SEV migration in KVM (Linux arch/x86/kvm/svm/sev.c, KVM_SEV_SEND_* and
KVM_SEV_RECEIVE_*): the sender's firmware encrypts guest memory for transport with the
session it made for the receiving platform; the receiver's firmware decrypts it into the
new guest's memory under that guest's key."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

from sevsim.api import commands as cmd
from sevsim.api.commands import Command
from sevsim.api.status import Status
from sevsim.host.kvm.uapi import KvmError
from sevsim.soc.paging import PAGE_4K

if TYPE_CHECKING:
    from sevsim.host.kernel import HostKernel
    from sevsim.host.kvm.kvm_main import Kvm


class SevMigration:
    """KVM_SEV_SEND_* and KVM_SEV_RECEIVE_* for one guest (mixed into ``Vm``)."""

    kvm: Kvm
    kernel: HostKernel
    sev: bool
    handle: int
    policy: int
    _hva_of: Callable[..., int]
    _kernel_buffer: Callable[[bytes], tuple[int, int]]
    _bind_asid: Callable[[], None]
    spa: Callable[[int], int]

    def sev_send_start(self, pdh: bytes, plat_certs: bytes, amd_certs: bytes) -> tuple[bytes, int]:
        """KVM_SEV_SEND_START: (the session blob for the receiver, the guest's policy)."""
        buffers = [self._kernel_buffer(x) for x in (pdh, plat_certs, amd_certs or b"\0")]
        session_va, session_pages = self._kernel_buffer(bytes(cmd.SESSION.size))
        psp_pa = self.kvm.sev.psp_pa
        try:
            status, out = self.kvm.sev_cmd_out(
                Command.SEND_START,
                handle=self.handle,
                pdh_paddr=psp_pa(buffers[0][0]),
                pdh_len=len(pdh),
                plat_certs_paddr=psp_pa(buffers[1][0]),
                plat_certs_len=len(plat_certs),
                amd_certs_paddr=psp_pa(buffers[2][0]),
                amd_certs_len=len(amd_certs),
                session_paddr=psp_pa(session_va),
                session_len=cmd.SESSION.size,
            )
            if status != Status.SUCCESS:
                raise KvmError("SEND_START", status)
            return self.kernel.read(session_va, cmd.SESSION.size), out.policy
        finally:
            for va, pages in [*buffers, (session_va, session_pages)]:
                self.kernel.free_pages(va, pages)

    def sev_send_update_data_query_lengths(self) -> tuple[int, int]:
        """KVM_SEV_SEND_UPDATE_DATA with hdr_len or trans_len 0: the firmware is asked with
        an empty buffer and answers INVALID_LENGTH with the sizes it needs (Linux
        __sev_send_update_data_query_lengths). Returns (hdr_len, trans_len)."""
        status, out = self.kvm.sev_cmd_out(Command.SEND_UPDATE_DATA, handle=self.handle)
        if status not in (Status.SUCCESS, Status.INVALID_LENGTH):
            raise KvmError("SEND_UPDATE_DATA length query", status)
        return out.hdr_len, out.trans_len

    def sev_send_update_data(self, gpa: int, length: int) -> tuple[bytes, bytes]:
        """KVM_SEV_SEND_UPDATE_DATA: one packet (header, ciphertext) of at most one guest
        page; like Linux, a longer range or one crossing a page boundary is EINVAL."""
        _check_one_page("SEND_UPDATE_DATA", gpa, length)
        hva = self._hva_of(gpa, length)  # sev_pin_memory of the one page
        hdr_va = self._transfer_buffer(0, cmd.PACKET_HEADER.size)
        trans_va = self._transfer_buffer(1, length)
        psp_pa = self.kvm.sev.psp_pa
        status = self.kvm.sev_cmd(
            Command.SEND_UPDATE_DATA,
            handle=self.handle,
            hdr_paddr=psp_pa(hdr_va),
            hdr_len=cmd.PACKET_HEADER.size,
            guest_paddr=self.kernel.pa(hva) | self.kernel.me_mask,  # the pinned page's PFN
            guest_len=length,
            trans_paddr=psp_pa(trans_va),
            trans_len=length,
        )
        if status != Status.SUCCESS:
            raise KvmError(f"SEND_UPDATE_DATA at GPA {gpa:#x}", status)
        # copy_to_user: the transport buffer (streamed: a page the cache need not keep), then
        # the header (a cached copy: its line stays for the next packet's header).
        data = self.kernel.read_stream(trans_va, length)
        return self.kernel.read(hdr_va, cmd.PACKET_HEADER.size), data

    def sev_send_finish(self) -> None:
        status = self.kvm.sev_cmd(Command.SEND_FINISH, handle=self.handle)
        if status != Status.SUCCESS:
            raise KvmError("SEND_FINISH", status)

    def sev_send_cancel(self) -> None:
        status = self.kvm.sev_cmd(Command.SEND_CANCEL, handle=self.handle)
        if status != Status.SUCCESS:
            raise KvmError("SEND_CANCEL", status)

    def sev_receive_start(self, pdh: bytes, session: bytes, policy: int) -> int:
        """KVM_SEV_RECEIVE_START with the sending platform's PDH, then ACTIVATE."""
        if not self.sev:
            raise KvmError("not an SEV guest", err=errno.ENOTTY)
        buffers = [self._kernel_buffer(pdh), self._kernel_buffer(session)]
        psp_pa = self.kvm.sev.psp_pa
        try:
            status, out = self.kvm.sev_cmd_out(
                Command.RECEIVE_START,
                handle=0,
                policy=policy,
                pdh_paddr=psp_pa(buffers[0][0]),
                pdh_len=len(pdh),
                session_paddr=psp_pa(buffers[1][0]),
                session_len=len(session),
            )
        finally:
            for va, pages in buffers:
                self.kernel.free_pages(va, pages)
        if status != Status.SUCCESS:
            raise KvmError("RECEIVE_START", status)
        self.handle, self.policy = out.handle, policy
        self._bind_asid()
        return self.handle

    def sev_receive_update_data(self, header: bytes, data: bytes, gpa: int) -> None:
        """KVM_SEV_RECEIVE_UPDATE_DATA: one packet into at most one guest page at ``gpa``;
        like Linux, a longer range or one crossing a page boundary is EINVAL."""
        if not self.sev:
            raise KvmError("not an SEV guest", err=errno.EINVAL)
        if not header or not data:
            raise KvmError("RECEIVE_UPDATE_DATA: empty header or data", err=errno.EINVAL)
        _check_one_page("RECEIVE_UPDATE_DATA", gpa, len(data))
        # psp_copy_user_blob: the header and the data into kernel buffers.
        hdr_va = self._transfer_buffer(0, len(header))
        trans_va = self._transfer_buffer(1, len(data))
        self.kernel.write(hdr_va, header)
        self.kernel.write_stream(trans_va, data)
        hva = self._hva_of(gpa, len(data), whole_write=True)  # pinned; the firmware fills it
        if not self.kvm.sme_coherent:
            # sev_clflush_pages: no dirty host-key line of the page may outlive the write.
            page = hva & ~(PAGE_4K - 1)
            for line in range(page, page + PAGE_4K, 64):
                self.kernel.core.clflush(line)
        psp_pa = self.kvm.sev.psp_pa
        status = self.kvm.sev_cmd(
            Command.RECEIVE_UPDATE_DATA,
            handle=self.handle,
            hdr_paddr=psp_pa(hdr_va),
            hdr_len=len(header),
            guest_paddr=self.kernel.pa(hva) | self.kernel.me_mask,  # the pinned page's PFN
            guest_len=len(data),
            trans_paddr=psp_pa(trans_va),
            trans_len=len(data),
        )
        if status != Status.SUCCESS:
            raise KvmError(f"RECEIVE_UPDATE_DATA at GPA {gpa:#x}", status)

    def sev_receive_finish(self) -> None:
        status = self.kvm.sev_cmd(Command.RECEIVE_FINISH, handle=self.handle)
        if status != Status.SUCCESS:
            raise KvmError("RECEIVE_FINISH", status)

    def _transfer_buffer(self, index: int, length: int) -> int:
        """Kernel buffers reused across packets (KVM kzallocs the header and transport
        buffers per ioctl; reusing them changes nothing the firmware or the guest can see:
        the firmware overwrites what it returns, and the host writes what it sends)."""
        pages = max(1, -(-length // PAGE_4K))
        buffers = self.__dict__.setdefault("_transfer", {})
        va, have = buffers.get(index, (0, 0))
        if have < pages:
            if va:
                self.kernel.free_pages(va, have)
            va = self.kernel.alloc_pages(pages)
            buffers[index] = (va, pages)
        return va

    def _free_transfer_buffers(self) -> None:
        for va, pages in self.__dict__.get("_transfer", {}).values():
            self.kernel.free_pages(va, pages)


def _check_one_page(what: str, gpa: int, length: int) -> None:
    """Linux: "Check if we are crossing the page boundary" — at most one page per packet."""
    if length <= 0:
        raise KvmError(f"{what}: empty guest range", err=errno.EINVAL)
    offset = gpa & (PAGE_4K - 1)
    if length > PAGE_4K or offset + length > PAGE_4K:
        raise KvmError(
            f"{what}: {length} bytes at GPA {gpa:#x} cross a page boundary", err=errno.EINVAL
        )
