"""QEMU's human monitor (HMP), as far as a user watching a guest needs it: ``info
registers``, ``x``/``xp`` and ``info tlb``/``info mem`` — what the *hypervisor* sees.

For a plain SEV guest the register state is in the unencrypted VMCB and in KVM's copy of
the GPRs, so ``info registers`` shows everything; for an SEV-ES guest it shows what KVM
still holds, the state before LAUNCH_UPDATE_VMSA, and says so. Memory is read
the way QEMU reads it: through the VMM's own mapping — ciphertext for an SEV guest's
private pages — or, when the guest's policy allows debugging (NODBG clear), decrypted by
the firmware (DBG_DECRYPT), as QEMU's SEV debug hooks do. ``x`` walks the guest's page
tables through that same view, with the C-bit (from CPUID) masked out as QEMU does: for an
SEV guest without debugging the tables themselves are ciphertext, so the walk fails.
"""

from __future__ import annotations

import shlex
import struct
from typing import TYPE_CHECKING

from sevsim.host import guest_walk
from sevsim.soc.x86.decode import GPR_NAMES, disassemble
from sevsim.soc.x86.hidden import Segment

if TYPE_CHECKING:
    from sevsim.host.kvm import Vcpu, Vm

SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}
POLICY_NODBG = 1 << 0
ADDR_MASK = guest_walk.ADDR_MASK


class MonitorError(Exception):
    """What HMP prints for a bad command line."""


class Monitor:
    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.cpu_index = 0
        self._fmt, self._size, self._count = "x", 4, 1  # QEMU remembers the last /FMT

    def execute(self, line: str) -> str:
        words = line.strip().split(None, 1)
        if not words:
            return ""
        name, rest = words[0], words[1] if len(words) > 1 else ""
        if name == "info":
            what = rest.strip()
            handler = {
                "registers": self.info_registers,
                "tlb": self.info_tlb,
                "mem": self.info_mem,
            }.get(what)
            if handler is None:
                raise MonitorError(
                    f"info: unknown or unsupported item {what!r} (registers, tlb, mem)"
                )
            return handler()
        if name in ("x", "xp"):
            return self.examine(rest, physical=name == "xp")
        if name == "cpu":
            index = _number(rest)
            if not 0 <= index < len(self.vm.vcpus):
                raise MonitorError("invalid CPU index")
            self.cpu_index = index
            return ""
        raise MonitorError(f"unknown command: '{name}'")

    @property
    def vcpu(self) -> Vcpu:
        return self.vm.vcpus[self.cpu_index]

    # ---- registers -----------------------------------------------------------------------
    def info_registers(self) -> str:
        v = self.vcpu.vmcb()
        regs = self.vcpu.regs
        gpr = {name: regs.get(name, 0) for name in GPR_NAMES} | {"rax": v.rax, "rsp": v.rsp}
        names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *GPR_NAMES[8:]]
        lines = []
        for i in range(0, 16, 4):
            lines.append(" ".join(f"{n.upper():<3}={gpr[n]:016x}" for n in names[i : i + 4]))
        flags = "".join(
            c if v.rflags >> bit & 1 else "-"
            for c, bit in (("D", 10), ("O", 11), ("S", 7), ("Z", 6), ("A", 4), ("P", 2), ("C", 0))
        )
        lines.append(
            f"RIP={v.rip:016x} RFL={v.rflags:08x} [{flags}] CPL={v.cpl} II=0 A20=1 SMM=0 HLT=0"
        )
        for name in ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr"):
            seg = Segment.from_attrib(
                *(getattr(v, f"{name}_{f}") for f in ("selector", "base", "limit", "attrib"))
            )
            label = {"ldtr": "LDT", "tr": "TR"}.get(name, name.upper())
            lines.append(
                f"{label:<3}={seg.selector:04x} {seg.base:016x} {seg.limit:08x} {seg.flags:08x}"
            )
        for name in ("gdtr", "idtr"):
            lines.append(
                f"{name[:3].upper()}=     {getattr(v, name + '_base'):016x} "
                f"{getattr(v, name + '_limit'):08x}"
            )
        lines.append(f"CR0={v.cr0:08x} CR2={v.cr2:016x} CR3={v.cr3:016x} CR4={v.cr4:08x}")
        lines.append(f"EFER={v.efer:016x}")
        if self.vcpu.guest_state_protected:
            lines.insert(
                0,
                "(SEV-ES: the guest's registers are encrypted in its VMSA; what KVM holds is "
                "its state before LAUNCH_UPDATE_VMSA)",
            )
        return "\n".join(lines) + "\n"

    # ---- memory ----------------------------------------------------------------------------
    def read_physical(self, gpa: int, n: int) -> bytes:
        """Guest-physical memory as the VMM reads it (QEMU's SEV debug hooks)."""
        vm = self.vm
        if vm.sev and not vm.policy & POLICY_NODBG:
            return vm.sev_dbg_decrypt(gpa, n)
        return vm.read(gpa, n)

    def _me_mask(self) -> int:
        ebx = self.vcpu.cpuid(0x8000_001F)[1]
        return 1 << (ebx & 0x3F) if self.vm.sev else 0

    def translate(self, va: int) -> int | None:
        """The guest's 4-level walk, through the VMM's view of its page tables."""
        v = self.vcpu.vmcb()
        if not v.cr0 & (1 << 31):
            return va & 0xFFFF_FFFF
        if not v.efer & (1 << 10):
            return None  # MODEL: the monitor walks long-mode tables only

        def read_entry(gpa: int) -> int:
            return struct.unpack("<Q", self.read_physical(gpa, 8))[0]

        try:
            return guest_walk.walk(read_entry, v.cr3, va, self._me_mask())[0]
        except (guest_walk.NotMapped, ValueError, OSError):
            return None

    def examine(self, rest: str, physical: bool) -> str:
        args = shlex.split(rest)
        if args and args[0].startswith("/"):
            self._parse_format(args.pop(0)[1:])
        if len(args) != 1:
            raise MonitorError("usage: x|xp /FMT ADDR (e.g. x /4xg 0x200000)")
        addr = _number(args[0])
        fmt, size, count = self._fmt, self._size, self._count
        if fmt == "i":
            return self._disassemble(addr, count, physical)
        if fmt == "c":
            size = 1
        total = size * count
        line_size = 8 if size == 1 else 16
        digits = {
            "x": size * 2,
            "o": -(-size * 8 // 3),
            "u": -(-size * 80 // 33),
            "d": -(-size * 80 // 33),
        }.get(fmt, 0)
        out = []
        pos = 0
        while pos < total:
            n = min(line_size, total - pos)
            head = f"{addr + pos:016x}:"
            data = self._read(addr + pos, n, physical)
            if data is None:
                out.append(head + " Cannot access memory")
                break
            words = []
            for i in range(0, n, size):
                value = int.from_bytes(data[i : i + size], "little")
                if fmt == "x":
                    words.append(f"0x{value:0{digits}x}")
                elif fmt == "o":
                    words.append(f"{'0' + format(value, 'o') if value else '0':>{digits}}")
                elif fmt == "u":
                    words.append(f"{value:>{digits}}")
                elif fmt == "d":
                    signed = value - (1 << 8 * size) if value >> (8 * size - 1) else value
                    words.append(f"{signed:>{digits}}")
                else:  # c
                    words.append(chr(value) if 32 <= value < 127 else f"\\x{value:02x}")
            out.append(head + "".join(" " + w for w in words))
            pos += n
        return "\n".join(out) + "\n"

    def _read(self, addr: int, n: int, physical: bool) -> bytes | None:
        out = b""
        pos = addr
        while len(out) < n:
            length = min(n - len(out), 4096 - (pos & 0xFFF))
            gpa = pos if physical else self.translate(pos)
            if gpa is None:
                return None
            try:
                out += self.read_physical(gpa, length)
            except (ValueError, OSError):
                return None
            pos += length
        return out

    def _disassemble(self, addr: int, count: int, physical: bool) -> str:
        code = self._read(addr, 15 * count, physical)
        if code is None:
            return f"{addr:016x}: Cannot access memory\n"
        v = self.vcpu.vmcb()
        bitness = (
            64
            if v.efer & (1 << 10) and v.cs_attrib & 0x200
            else (32 if v.cr0 & 1 and v.cs_attrib & 0x400 else 16)
        )
        return "".join(
            f"0x{ip:016x}:  {text}\n" for ip, _, text in disassemble(code, addr, bitness, count)
        )

    def _parse_format(self, spec: str) -> None:
        digits = ""
        while spec and spec[0].isdigit():
            digits, spec = digits + spec[0], spec[1:]
        if digits:
            self._count = int(digits)
        for ch in spec:
            if ch in "xduoci":
                self._fmt = ch
            elif ch in SIZES:
                self._size = SIZES[ch]
            else:
                raise MonitorError(f"invalid char in format: '{ch}'")

    # ---- page tables ------------------------------------------------------------------------
    def _mappings(self):
        """(VA, GPA, size, writable, user, nx) of every present leaf, in VA order."""
        v = self.vcpu.vmcb()
        if not v.cr0 & (1 << 31) or not v.efer & (1 << 10):
            return
        mask = ADDR_MASK & ~self._me_mask()

        def walk(table: int, level: int, base: int, w: bool, u: bool, nx: bool):
            shift = 39 - 9 * level
            try:
                raw = self.read_physical(table, 4096)
            except (ValueError, OSError):
                return
            for i, entry in enumerate(struct.unpack("<512Q", raw)):
                if not entry & 1:
                    continue
                va = base | i << shift
                if level == 0 and va >> 47:
                    va |= 0xFFFF << 48
                ew, eu, enx = w and entry >> 1 & 1, u and entry >> 2 & 1, nx or entry >> 63
                if level == 3 or (level in (1, 2) and entry & 0x80):
                    size = 1 << shift
                    yield va, entry & mask & ~(size - 1), size, ew, eu, enx
                else:
                    yield from walk(entry & mask, level + 1, va, ew, eu, enx)

        yield from walk(v.cr3 & mask, 0, 0, True, True, False)

    def info_tlb(self) -> str:
        lines = [
            f"{va:016x}: {gpa:016x} {'X' if not nx else '-'}{'U' if u else '-'}{'W' if w else '-'}"
            for va, gpa, _, w, u, nx in self._mappings()
        ]
        return "\n".join(lines) + "\n" if lines else "PG disabled\n"

    def info_mem(self) -> str:
        ranges: list[list] = []
        for va, _, size, w, u, _nx in self._mappings():
            prot = f"{'u' if u else '-'}r{'w' if w else '-'}"
            if ranges and ranges[-1][1] == va and ranges[-1][2] == prot:
                ranges[-1][1] = va + size
            else:
                ranges.append([va, va + size, prot])
        lines = [f"{s:016x}-{e:016x} {e - s:016x} {p}" for s, e, p in ranges]
        return "\n".join(lines) + "\n" if lines else "PG disabled\n"


def _number(text: str) -> int:
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise MonitorError(f"invalid number: {text.strip()!r}") from None
