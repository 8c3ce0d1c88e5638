"""The PSP mailbox: the only door to the SEV firmware (sev-api.md §1.1).

Three 32-bit registers of the PSP's MMIO space: CmdResp (C2PMSG_32) and CmdBufAddr_Lo/Hi
(C2PMSG_56/57). The host writes the command buffer's physical address (C-bit included
when it runs with SME) into Lo/Hi, then writes CmdResp = (command id << 16) | IOC. The
firmware reads the buffer from DRAM, runs the command, and completes by writing CmdResp
with bit 31 (RESP) set, the command id in bits 26:16 and the status in bits 15:0.

The model completes the command during the CmdResp write (the host's poll for RESP then
succeeds at once). Other offsets of the register block read as zero and ignore writes.
"""

from __future__ import annotations

from collections.abc import Callable

from sevsim.api.commands import (
    CMDRESP_CMD_MASK,
    CMDRESP_CMD_SHIFT,
    CMDRESP_RESP,
    CMDRESP_STATUS_MASK,
)

# Linux drivers/crypto/ccp/sp-pci.c sev_vdata.
REGISTER_SETS = {
    "sevv1": {"cmdresp": 0x10580, "cmdbuff_addr_lo": 0x105E0, "cmdbuff_addr_hi": 0x105E4},
    "sevv2": {"cmdresp": 0x10980, "cmdbuff_addr_lo": 0x109E0, "cmdbuff_addr_hi": 0x109E4},
}


class Mailbox:
    def __init__(self, register_set: str, dispatch: Callable[[int, int], int]) -> None:
        self.registers = dict(REGISTER_SETS[register_set])
        self._dispatch = dispatch
        self._cmdresp = CMDRESP_RESP  # idle: the previous command is complete
        self._lo = 0
        self._hi = 0
        self.commands_completed = 0

    def __repr__(self) -> str:
        return f"<Mailbox CmdResp={self._cmdresp:#010x}>"

    def read32(self, offset: int) -> int:
        regs = self.registers
        if offset == regs["cmdresp"]:
            return self._cmdresp
        if offset == regs["cmdbuff_addr_lo"]:
            return self._lo
        if offset == regs["cmdbuff_addr_hi"]:
            return self._hi
        return 0

    def write32(self, offset: int, value: int) -> None:
        value &= 0xFFFF_FFFF
        regs = self.registers
        if offset == regs["cmdbuff_addr_lo"]:
            self._lo = value
        elif offset == regs["cmdbuff_addr_hi"]:
            self._hi = value
        elif offset == regs["cmdresp"] and not value & CMDRESP_RESP:
            command = (value & CMDRESP_CMD_MASK) >> CMDRESP_CMD_SHIFT
            status = self._dispatch(command, (self._hi << 32) | self._lo)
            self._cmdresp = (
                CMDRESP_RESP | (command << CMDRESP_CMD_SHIFT) | (status & CMDRESP_STATUS_MASK)
            )
            self.commands_completed += 1
