"""The AES engine against an independent per-block reference, and the known properties of
the XE/XEX modes (SEVurity, hardware.md §5)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import make_machine, make_memctl
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from sevsim.profiles import get_profile
from sevsim.soc.dram import REGION_SIZE
from sevsim.soc.engine import PARALLEL_MIN, AesEngine, SlotCipher, _Job
from sevsim.soc.tweak import (
    CHUNK_SIZE,
    SEVURITY_T4,
    SEVURITY_T5,
    SEVURITY_T6,
    TweakFunction,
    xe_constants,
)

PHYS_BITS = 48
KEY = bytes(range(16))
# Arbitrary, distinct test constants: the reference below XORs them itself.
CONSTANTS = {i: bytes((i * 37 + j * 11 + 5) & 0xFF for j in range(16)) for i in range(4, PHYS_BITS)}


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def ref_tweak(pa: int) -> bytes:
    t = bytes(16)
    for bit in range(4, PHYS_BITS):
        if pa >> bit & 1:
            t = xor(t, CONSTANTS[bit])
    return t


def ref_encrypt(mode: str, pa: int, data: bytes) -> bytes:
    """hardware.md §5.2, one block at a time."""
    aes = Cipher(algorithms.AES(KEY), modes.ECB())
    out = b""
    for off in range(0, len(data), 16):
        t = ref_tweak(pa + off)
        c = aes.encryptor().update(xor(data[off : off + 16], t))
        out += xor(c, t) if mode == "xex" else c
    return out


def engine(mode: str) -> AesEngine:
    return AesEngine(mode, TweakFunction(CONSTANTS, PHYS_BITS))


def bulk(eng: AesEngine, pa: int, data: bytes, encrypt: bool) -> bytes:
    src = np.frombuffer(data, dtype=np.uint8)
    dst = np.empty_like(src)
    (eng.encrypt if encrypt else eng.decrypt)(SlotCipher(KEY), pa, src, dst)
    return dst.tobytes()


aligned_pa = st.integers(0, (1 << PHYS_BITS) // 16 - 1).map(lambda b: b * 16)


@pytest.mark.parametrize("mode", ["xe", "xex"])
@settings(max_examples=40, deadline=None)
@given(pa=aligned_pa, blocks=st.integers(1, 40))
def test_bulk_path_matches_reference(mode, pa, blocks):
    pa = min(pa, (1 << PHYS_BITS) - 16 * blocks)
    data = os.urandom(16 * blocks)
    ct = bulk(engine(mode), pa, data, encrypt=True)
    assert ct == ref_encrypt(mode, pa, data)
    assert bulk(engine(mode), pa, ct, encrypt=False) == data


@pytest.mark.parametrize("mode", ["xe", "xex"])
def test_bulk_path_across_chunk_boundaries(mode):
    # Spans three tweak chunks, starting and ending mid-chunk.
    pa = 5 * CHUNK_SIZE - 4096 - 48
    data = os.urandom(CHUNK_SIZE + 8192 + 96)
    eng = engine(mode)
    ct = bulk(eng, pa, data, encrypt=True)
    assert ct[:64] == ref_encrypt(mode, pa, data[:64])
    edge = 4096 + 48 - 16  # the blocks around the first chunk boundary
    assert ct[edge : edge + 48] == ref_encrypt(mode, pa + edge, data[edge : edge + 48])
    assert ct[-32:] == ref_encrypt(mode, pa + len(data) - 32, data[-32:])
    assert bulk(eng, pa, ct, encrypt=False) == data


def ref_encrypt_vectorised(
    mode: str, pa: int, data: bytes, key: bytes = KEY, constants=CONSTANTS
) -> bytes:
    """hardware.md §5.2 for many blocks at once: each block's tweak XORed together from
    the per-bit constants, then one AES-ECB call from `cryptography` over all of P ^ T."""
    blocks = len(data) // 16
    addresses = pa + 16 * np.arange(blocks, dtype=np.uint64)
    t = np.zeros((blocks, 16), dtype=np.uint8)
    for bit, value in constants.items():
        has_bit = (addresses >> np.uint64(bit)) & np.uint64(1) == 1
        t[has_bit] ^= np.frombuffer(value, dtype=np.uint8)
    t = t.reshape(-1)
    x = (np.frombuffer(data, dtype=np.uint8) ^ t).tobytes()
    c = np.frombuffer(Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(x), np.uint8)
    return (c ^ t).tobytes() if mode == "xex" else c.tobytes()


def test_vectorised_reference_agrees_with_the_block_by_block_one():
    pa = 0x1234_5678_9A00
    data = os.urandom(16 * 70)
    for mode in ("xe", "xex"):
        assert ref_encrypt_vectorised(mode, pa, data) == ref_encrypt(mode, pa, data)


@pytest.mark.parametrize("mode", ["xe", "xex"])
@pytest.mark.parametrize("lanes", [2, 3])
@pytest.mark.parametrize(
    ("pa", "size"),
    [
        # Starts mid-chunk and mid-page, ends mid-chunk: lanes of unequal shares.
        (7 * CHUNK_SIZE + 3 * 4096 + 48, 4 * CHUNK_SIZE + 5 * 4096 + 80),
        # Starts one block before a chunk boundary, high in the address space.
        ((1 << 40) + CHUNK_SIZE - 16, 5 * CHUNK_SIZE + 7 * 16),
    ],
)
def test_bulk_path_split_over_lanes_matches_reference(mode, lanes, pa, size):
    assert size >= PARALLEL_MIN  # large enough to be split over the lanes
    data = os.urandom(size)
    eng = AesEngine(mode, TweakFunction(CONSTANTS, PHYS_BITS), lanes=lanes)
    cipher = SlotCipher(KEY, lanes=lanes)
    src = np.frombuffer(data, dtype=np.uint8)
    ct = np.empty_like(src)
    eng.encrypt(cipher, pa, src, ct)
    assert ct.tobytes() == ref_encrypt_vectorised(mode, pa, data)
    back = np.empty_like(src)
    eng.decrypt(cipher, pa, ct, back)
    assert back.tobytes() == data
    # The same engine again, on a different range: its lanes' cached tweaks must follow.
    eng.encrypt(cipher, pa + CHUNK_SIZE, src, ct)
    assert ct.tobytes() == ref_encrypt_vectorised(mode, pa + CHUNK_SIZE, data)


@pytest.mark.parametrize("mode", ["xe", "xex"])
def test_every_lane_alone_computes_the_reference(mode):
    # Which lane takes which chunk depends on thread timing; here each lane takes them all,
    # with its own ECB contexts and scratch (a chunk per claim, partial chunks at both ends).
    pa, size = 3 * CHUNK_SIZE + 4096 + 16, 4 * CHUNK_SIZE + 96
    data = os.urandom(size)
    eng = AesEngine(mode, TweakFunction(CONSTANTS, PHYS_BITS), lanes=3)
    cipher = SlotCipher(KEY, lanes=3)
    src = np.frombuffer(data, dtype=np.uint8)
    ct = np.empty_like(src)
    reference = ref_encrypt_vectorised(mode, pa, data)
    for lane in range(3):
        ct[:] = 0
        job = _Job(pieces=5)  # the chunks [pa, pa + size) touches
        eng._take(job, lane, cipher._lanes[lane][0], pa, src, ct, True)
        assert job.claim() is None
        assert ct.tobytes() == reference


@pytest.mark.parametrize(("name", "mode"), [("naples", "xe"), ("milan", "xex")])
def test_memctl_bulk_write_across_dram_regions_matches_reference(name, mode):
    # xex with the fixed constants, so that the test can compute the tweaks itself.
    memctl = make_memctl(name, xex_fixed_tweak=True)
    assert memctl.engine_mode == mode
    profile = get_profile(name)
    constants = xe_constants(profile.name, profile.maxphyaddr, profile.xe_zero_tweak_bits)
    key = os.urandom(memctl.key_bytes)
    memctl.key_port().load(5, key)
    pa = 3 * REGION_SIZE - 2 * CHUNK_SIZE - 4096 + 32  # crosses a DRAM region boundary
    data = os.urandom(6 * CHUNK_SIZE + 4096 + 48)
    memctl.write_from(pa, np.frombuffer(data, dtype=np.uint8), 5)
    assert memctl.dram.read(pa, len(data)) == ref_encrypt_vectorised(mode, pa, data, key, constants)
    out = np.empty(len(data), dtype=np.uint8)
    memctl.read_into(pa, out, 5)
    assert out.tobytes() == data


@pytest.mark.parametrize("mode", ["xe", "xex"])
@settings(max_examples=40, deadline=None)
@given(line=st.integers(0, (1 << PHYS_BITS) // 64 - 1), data=st.binary(min_size=64, max_size=64))
def test_line_path_matches_reference(mode, line, data):
    pa = line * 64
    eng = engine(mode)
    ct = eng.encrypt_line(SlotCipher(KEY), pa, data)
    assert ct == ref_encrypt(mode, pa, data)
    assert eng.decrypt_line(SlotCipher(KEY), pa, ct) == data


@settings(max_examples=60, deadline=None)
@given(p=aligned_pa, q=aligned_pa)
def test_tweak_is_linear(p, q):
    t = TweakFunction(CONSTANTS, PHYS_BITS)
    assert xor(t.block(p), t.block(q)) == t.block(p ^ q)
    assert t.block(p) == ref_tweak(p)


@pytest.mark.parametrize("name", ["naples", "milan"])
def test_same_plaintext_at_two_addresses_differs(name):
    m = make_machine(name)
    slot = m.memctl.host_key_slot
    block = b"sixteen byte blk"
    m.memctl.write(0x10000, block * 4, slot)
    m.memctl.write(0x20000, block * 4, slot)
    stored = m.dram.read(0x10000, 64) + m.dram.read(0x20000, 64)
    blocks = {stored[i : i + 16] for i in range(0, 128, 16)}
    assert len(blocks) == 8  # every block encrypts differently: the tweak follows the address
    assert block not in blocks


def test_xe_ciphertext_moving_reveals_published_tweak_constants():
    """SEVurity §IV on a Zen 1 (xe) engine: a ciphertext block moved from p to q decrypts
    to m ^ T(p) ^ T(q); with q = p ^ 0x30 that is m ^ t4 ^ t5, the published constants."""
    m = make_machine("naples")
    assert m.memctl.engine_mode == "xe"
    slot = m.memctl.host_key_slot
    p = 0x123400
    plain = b"A" * 16
    m.memctl.write(p, plain, slot)
    cipher_block = m.dram.read(p, 16)
    for delta, expected in (
        (0x10, SEVURITY_T4),
        (0x30, xor(SEVURITY_T4, SEVURITY_T5)),
        (0x40, SEVURITY_T6),
    ):
        q = p ^ delta
        m.dram.write(q, cipher_block)  # what a malicious hypervisor or DMA can do
        assert m.memctl.read(q, 16, slot) == xor(plain, expected)


def test_xex_ciphertext_moving_needs_the_tweak_difference():
    m = make_machine("milan")
    assert m.memctl.engine_mode == "xex"
    slot = m.memctl.host_key_slot
    tweak = m.memctl._engine._tweak
    p, q = 0x200000, 0x200040
    plain = b"attacker-chosen!"
    m.memctl.write(p, plain, slot)
    c = m.dram.read(p, 16)
    m.dram.write(q, c)
    moved = m.memctl.read(q, 16, slot)
    assert moved != plain and moved != xor(plain, xor(tweak.block(p), tweak.block(q)))
    adjust = xor(tweak.block(p), tweak.block(q))
    m.dram.write(q, xor(c, adjust))
    assert m.memctl.read(q, 16, slot) == xor(plain, adjust)


@pytest.mark.parametrize("name", ["naples", "milan"])
def test_decrypt_after_encrypt_is_identity(name):
    m = make_machine(name)
    slot = m.memctl.host_key_slot
    data = os.urandom(3 * 4096 + 80)
    m.memctl.write(0x7FF0, data, slot)  # unaligned start and length: read-modify-write
    assert m.memctl.read(0x7FF0, len(data), slot) == data
    assert m.dram.read(0x7FF0, len(data)) != data


def test_wrong_key_gives_garbage():
    memctl = make_memctl("milan")
    data = b"the quick brown fox jumps over the lazy dog, twice!" + bytes(13)
    memctl.write(0x40000, data, memctl.host_key_slot)
    stored = memctl.dram.read(0x40000, 64)
    assert memctl.read(0x40000, 64, 0) == stored != data  # no key: the ciphertext as stored
    empty = memctl.read(0x40000, 64, 7)  # a slot nothing was ever loaded into
    port = memctl.key_port()
    port.load(9, os.urandom(16))
    other = memctl.read(0x40000, 64, 9)
    assert len({data, empty, other, stored}) == 4


def test_one_flipped_ciphertext_bit_garbles_exactly_one_block():
    m = make_machine("milan")
    slot = m.memctl.host_key_slot
    data = os.urandom(64)
    m.memctl.write(0x9000, data, slot)
    stored = bytearray(m.dram.read(0x9000, 64))
    stored[20] ^= 0x01
    m.dram.write(0x9000, bytes(stored))
    back = m.memctl.read(0x9000, 64, slot)
    assert back[:16] == data[:16] and back[32:] == data[32:]
    assert back[16:32] != data[16:32]


def test_xe_constants_are_fixed_and_periodic_xex_are_random_per_boot():
    a, b = make_machine("naples", seed=None), make_machine("naples", seed=None)
    ta, tb = a.memctl._engine._tweak, b.memctl._engine._tweak
    for bit in range(4, 43):
        t = ta.block(1 << bit)
        assert t == tb.block(1 << bit)  # fixed in the silicon
        assert t == t[:4] * 4  # 4-byte periodic, like SEVurity's measured constants
    x, y = make_machine("milan", seed=None), make_machine("milan", seed=None)
    assert x.memctl._engine._tweak.block(1 << 20) != y.memctl._engine._tweak.block(1 << 20)
    s1, s2 = make_machine("milan", seed=5), make_machine("milan", seed=5)
    assert s1.memctl._engine._tweak.block(1 << 20) == s2.memctl._engine._tweak.block(1 << 20)


def test_engine_mode_override_and_key_size():
    m = make_machine("milan", engine_key_bits=256)
    assert m.memctl.key_bytes == 32
    m.memctl.write(0, bytes(64), m.memctl.host_key_slot)
    assert m.memctl.read(0, 64, m.memctl.host_key_slot) == bytes(64)
    from sevsim.profiles import MILAN
    from sevsim.soc import Machine

    assert Machine(MILAN.with_(seed=1), engine_mode="xe").memctl.engine_mode == "xe"
