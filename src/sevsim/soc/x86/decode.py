"""Decoding the instruction at RIP, where the model must act on it (iced-x86).

The engine executes instructions itself; the model decodes one only when it has to
complete or emulate it: an intercepted instruction's length (NEXT_RIP) and operands (the
register of MOV to CRn, the address of INVLPG or CLFLUSH), an instruction the engine does
not implement for the model (VMMCALL, RDRAND), the exact CR2 of a page fault, and the
monitor's disassembly.
"""

from __future__ import annotations

from collections.abc import Callable

import iced_x86 as iced
from unicorn import x86_const as X

Mnemonic = iced.Mnemonic
OpKind = iced.OpKind
Register = iced.Register
RegisterInfo = iced.RegisterInfo
MAX_INSN = 15
# The 64-bit general-purpose registers, in the order of their encodings (and of QEMU's
# `info registers`); their lower-case names are the keys of KVM's copy of a guest's GPRs.
GPR_NAMES = "rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15".split()

# iced register -> Unicorn register of the same name (64-bit GPRs, CRs, segment regs).
_NAMES = {getattr(iced.Register, n): n for n in dir(iced.Register) if n.isupper()}
_SEG_BASE_IN_64 = {iced.Register.FS, iced.Register.GS}


def decode(code: bytes, ip: int, bitness: int) -> iced.Instruction:
    return iced.Decoder(bitness, code, ip=ip).decode()


def uc_register(reg: int) -> int:
    """The Unicorn id of the full register that holds an iced register."""
    full = iced.RegisterInfo(reg).full_register
    return getattr(X, f"UC_X86_REG_{_NAMES[full]}")


def full_name(reg: int) -> str:
    """The lower-case name of the 64-bit register that holds ``reg`` (e.g. EAX -> rax)."""
    return _NAMES[iced.RegisterInfo(reg).full_register].lower()


def register_value(read: Callable[[int], int], reg: int) -> int:
    """The value of an iced register operand (of any size)."""
    size = iced.RegisterInfo(reg).size
    value = read(uc_register(reg))
    if _NAMES[reg] in ("AH", "BH", "CH", "DH"):
        return (value >> 8) & 0xFF
    return value & ((1 << (8 * size)) - 1)


def memory_address(
    ins: iced.Instruction, read: Callable[[int], int], seg_base: Callable[[int], int], bitness: int
) -> int:
    """The linear address of an instruction's memory operand."""
    if ins.is_ip_rel_memory_operand:
        ea = ins.ip_rel_memory_address
    else:
        ea = ins.memory_displacement
        if ins.memory_base != iced.Register.NONE:
            ea += register_value(read, ins.memory_base)
        if ins.memory_index != iced.Register.NONE:
            ea += register_value(read, ins.memory_index) * ins.memory_index_scale
    asize = {16: 0xFFFF, 32: 0xFFFF_FFFF, 64: (1 << 64) - 1}[_address_size(ins, bitness)]
    ea &= asize
    seg = ins.memory_segment
    if bitness < 64 or seg in _SEG_BASE_IN_64:
        ea += seg_base(seg)
    return ea & ((1 << 64) - 1 if bitness == 64 else 0xFFFF_FFFF)


def _address_size(ins: iced.Instruction, bitness: int) -> int:
    base = ins.memory_base if ins.memory_base != iced.Register.NONE else ins.memory_index
    if base in (iced.Register.NONE, iced.Register.RIP, iced.Register.EIP):
        return bitness if not ins.is_ip_rel_memory_operand else 64
    return iced.RegisterInfo(base).size * 8


def segment_index(reg: int) -> int:
    """ES..GS as 0..5 (the CPU's order)."""
    return [
        iced.Register.ES,
        iced.Register.CS,
        iced.Register.SS,
        iced.Register.DS,
        iced.Register.FS,
        iced.Register.GS,
    ].index(reg)


_FORMATTER = iced.Formatter(iced.FormatterSyntax.GAS)


def disassemble(code: bytes, ip: int, bitness: int, count: int) -> list[tuple[int, bytes, str]]:
    """(address, bytes, text) of up to ``count`` instructions (GNU syntax, as gdb shows)."""
    out = []
    decoder = iced.Decoder(bitness, code, ip=ip)
    for ins in decoder:
        if len(out) >= count:
            break
        start = ins.ip - ip
        out.append((ins.ip, code[start : start + ins.len], _FORMATTER.format(ins)))
    return out
