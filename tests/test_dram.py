"""Sparse DRAM: bytes as stored, memory only for what was written."""

from __future__ import annotations

import pytest

from sevsim.bench import bench_sparse
from sevsim.profiles import TiB
from sevsim.soc import MachineCheck
from sevsim.soc.dram import DRAM, REGION_SIZE


def test_untouched_memory_reads_zero_and_costs_nothing():
    dram = DRAM(1 * TiB)
    assert dram.read(0xFA_5678_9000, 64) == bytes(64)
    assert dram.written_bytes == 0
    assert not dram._regions  # reading never allocates


def test_writes_are_page_granular_and_cross_regions():
    dram = DRAM(1 * TiB)
    pa = 3 * REGION_SIZE - 10
    dram.write(pa, b"x" * 20)  # straddles two regions
    assert dram.read(pa - 2, 24) == b"\0\0" + b"x" * 20 + b"\0\0"
    assert list(dram.written_pages()) == [3 * REGION_SIZE - 4096, 3 * REGION_SIZE]
    assert dram.written_bytes == 8192


def test_out_of_range_is_a_machine_check():
    dram = DRAM(1 << 30)
    with pytest.raises(MachineCheck):
        dram.read((1 << 30) - 8, 16)
    with pytest.raises(MachineCheck):
        dram.write(1 << 30, b"x")


def test_bad_size_is_refused():
    with pytest.raises(ValueError):
        DRAM(1000)


def test_resident_memory_grows_with_touched_pages_only():
    """A fresh process builds a 1 TiB machine and writes 8 MiB of it through the memory
    controller; its RSS must grow by about that much, not by the size of DRAM."""
    result = bench_sparse(8 << 20, progress=lambda _message: None)
    assert result["sparse_dram_bytes"] == 1 * TiB
    assert result["written_mib"] == 8
    assert result["sparse_rss_mib"] <= 2 * 8 + 150
