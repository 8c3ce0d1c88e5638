"""Byte layouts declared once and used both to parse and to build.

A ``Layout`` lists (offset, format, name) triples exactly as the spec's tables do; it
checks that the fields do not overlap and fit the declared size, and compiles them into
one ``struct.Struct`` (little-endian, explicit padding), so parsing and building can never
disagree. Reserved gaps are zero when built and ignored when parsed, unless the spec
makes them must-be-zero, in which case the caller checks ``reserved_ok``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

_SIZES = {"B": 1, "H": 2, "I": 4, "Q": 8}


@dataclass(frozen=True)
class Field:
    offset: int
    fmt: str  # "B", "H", "I", "Q" (unsigned integers) or "<n>s" (bytes)
    name: str

    @property
    def size(self) -> int:
        return int(self.fmt[:-1]) if self.fmt.endswith("s") else _SIZES[self.fmt]

    @property
    def is_bytes(self) -> bool:
        return self.fmt.endswith("s")


class Layout:
    def __init__(self, name: str, size: int, spec: str, *specs: tuple[int, str, str]) -> None:
        self.name = name
        self.size = size
        self.spec = spec  # where the table is: "sev-api.md §1.2", ...
        self.fields = [Field(*s) for s in specs]
        fmt, pos = "<", 0
        for f in self.fields:
            if f.offset < pos:
                raise ValueError(
                    f"{name}: field {f.name} at {f.offset:#x} overlaps the previous one"
                )
            if f.offset > pos:
                fmt += f"{f.offset - pos}x"
            fmt += f.fmt
            pos = f.offset + f.size
        if pos > size:
            raise ValueError(f"{name}: fields end at {pos:#x}, past the size {size:#x}")
        if pos < size:
            fmt += f"{size - pos}x"
        self._struct = struct.Struct(fmt)
        assert self._struct.size == size
        # What build needs per call, worked out once: the names in order, the byte fields.
        self._names = tuple(f.name for f in self.fields)
        self._byte_fields = tuple((f.name, f.size) for f in self.fields if f.is_bytes)
        self.Record = make_dataclass(
            name,
            [
                (
                    f.name,
                    bytes if f.is_bytes else int,
                    field(default=bytes(f.size) if f.is_bytes else 0),
                )
                for f in self.fields
            ],
        )

    def __repr__(self) -> str:
        return f"<Layout {self.name} ({self.size} bytes, {self.spec})>"

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name!r}")

    def new(self, **values: Any) -> Any:
        return self.Record(**values)

    def parse(self, data: bytes) -> Any:
        """A record from exactly ``size`` bytes (a longer buffer is cut, a shorter one refused)."""
        if len(data) < self.size:
            raise ValueError(f"{self.name}: {len(data)} bytes, need {self.size}")
        return self.Record(*self._struct.unpack_from(data))

    def build(self, record: Any = None, **values: Any) -> bytes:
        if record is None:
            record = self.Record(**values)
        for name, size in self._byte_fields:
            v = getattr(record, name)
            if len(v) != size:
                raise ValueError(f"{self.name}.{name}: {len(v)} bytes, the field holds {size}")
        return self._struct.pack(*[getattr(record, name) for name in self._names])

    def reserved_ok(self, data: bytes) -> bool:
        """True when every byte not covered by a field is zero (must-be-zero gaps)."""
        covered = bytearray(self.size)
        for f in self.fields:
            covered[f.offset : f.offset + f.size] = b"\x01" * f.size
        return all(b == 0 for b, c in zip(data[: self.size], covered, strict=False) if not c)


def record_dict(record: Any) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in fields(record)}
