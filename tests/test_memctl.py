"""Key selection (hardware.md §3.4, §5.4), TSME, and that no key ever becomes readable."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import make_machine, make_memctl, make_platform

import sevsim.soc.memctl as memctl_module
import sevsim.soc.tweak as tweak_module
from sevsim.demo import run_demo
from sevsim.host import HostKernel
from sevsim.info import describe
from sevsim.profiles import get_profile
from sevsim.soc.memctl import NO_KEY


@pytest.mark.parametrize(
    ("smee", "tsme", "c_bit", "asid", "expected"),
    [
        (True, False, True, 0, "host"),  # SME: host C=1
        (True, False, False, 0, NO_KEY),  # host C=0: plaintext
        (True, False, True, 7, 7),  # guest C=1: the ASID's key
        (True, False, False, 7, NO_KEY),  # guest C=0 with NPT C=0: plaintext
        (True, True, False, 0, "host"),  # TSME: C=0 is encrypted with the host key
        (True, True, True, 0, "host"),  # TSME: C=1 is the same key
        (True, True, True, 7, 7),  # TSME does not take a guest's key away
        (False, False, True, 0, NO_KEY),  # SMEE off: the C-bit means nothing
        (False, True, True, 0, "host"),  # SMEE off, TSME on: still encrypted
    ],
)
def test_key_selection(smee, tsme, c_bit, asid, expected):
    m = make_machine("milan", smee=smee, tsme=tsme)
    want = m.memctl.host_key_slot if expected == "host" else expected
    assert m.memctl.key_slot(c_bit, asid) == want


def test_tsme_stores_c0_and_c1_identically():
    m = make_machine("rome", tsme=True)
    data = b"same plaintext, same address, same key under TSME!!" + bytes(12)
    m.memctl.write(0x5000, data, m.memctl.key_slot(False))
    c0 = m.dram.read(0x5000, 64)
    m.memctl.write(0x5000, data, m.memctl.key_slot(True))
    assert m.dram.read(0x5000, 64) == c0 != data


def test_key_port_belongs_to_the_psp():
    m = make_platform("milan").machine
    with pytest.raises(PermissionError):
        m.memctl.key_port()  # the PSP took it at power-on


def test_key_port_loads_keys_and_checks_them():
    memctl = make_memctl("milan")
    port = memctl.key_port()
    with pytest.raises(PermissionError):
        memctl.key_port()
    with pytest.raises(ValueError):
        port.load(5, b"short")
    with pytest.raises(ValueError):
        port.load(memctl.max_slot + 1, bytes(16))
    port.load(5, bytes(16))
    memctl.write(0, b"x" * 16, 5)
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    t = memctl._engine._tweak.block(0)
    aes = Cipher(algorithms.AES(bytes(16)), modes.ECB()).encryptor()
    inner = aes.update(bytes(a ^ b for a, b in zip(b"x" * 16, t, strict=True)))
    assert memctl.dram.read(0, 16) == bytes(a ^ b for a, b in zip(inner, t, strict=True))


def _reachable(root, max_depth=6):
    """Every object reachable from root through public attributes, properties, items."""
    seen = set()
    stack = [(root, 0)]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen or depth > max_depth:
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, (str, bytes, bytearray, int, float, bool, type(None), np.ndarray)):
            continue
        if isinstance(obj, dict):
            children = list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = list(obj)
        else:
            children = []
            for name in dir(obj):
                if name.startswith("_"):
                    continue
                try:
                    value = getattr(obj, name)
                except Exception:  # noqa: BLE001 - a property may refuse; that exposes nothing
                    continue
                if callable(value) and not isinstance(value, (dict, list)):
                    continue
                children.append(value)
        stack.extend((c, depth + 1) for c in children)


def _contains_secret(obj, secrets: list[bytes]) -> bool:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        blob = bytes(obj)
    elif isinstance(obj, np.ndarray):
        blob = obj.tobytes()
    elif isinstance(obj, int) and not isinstance(obj, bool):
        return any(obj in (int.from_bytes(s, "little"), int.from_bytes(s, "big")) for s in secrets)
    else:
        blob = repr(obj).encode()
    return any(s in blob or s.hex().encode() in blob for s in secrets)


@pytest.fixture
def created_keys(monkeypatch) -> list[bytes]:
    """Every key any key slot is given from now on (recorded by the test, not the model)."""
    keys: list[bytes] = []
    real_cipher = memctl_module.SlotCipher

    class Spy(real_cipher):
        __slots__ = ()

        def __init__(self, key: bytes) -> None:
            keys.append(bytes(key))
            super().__init__(key)

    monkeypatch.setattr(memctl_module, "SlotCipher", Spy)
    return keys


def test_no_public_attribute_or_output_exposes_key_bytes(monkeypatch, created_keys):
    keys = created_keys
    tweaks: list[bytes] = []
    real_random_constants = tweak_module.random_constants

    def spy_constants(entropy, bits):
        consts = real_random_constants(entropy, bits)
        tweaks.extend(consts.values())
        return consts

    monkeypatch.setattr(memctl_module, "random_constants", spy_constants)

    m = make_machine("milan", seed=None)
    kernel = HostKernel(m.cores[0])
    kernel.boot()
    va = kernel.alloc_pages(1)
    kernel.write(va, b"guest-visible data")
    port = m.memctl.key_port()  # no PSP on this bench: the test holds the key-slot port
    port.load(3, os.urandom(16))
    m.memctl.read(0x1000, 64, 3)
    m.memctl.read(0x1000, 64, 4)  # an empty slot gets a key of its own
    m.cores[0].wbinvd()
    assert len(keys) >= 3 and tweaks
    secrets = keys + tweaks

    leaks = [type(o).__name__ for o in _reachable(m) if _contains_secret(o, secrets)]
    leaks += [type(o).__name__ for o in _reachable(kernel) if _contains_secret(o, secrets)]
    assert not leaks
    for obj in (m, m.memctl, m.cache, m.dram, m.cores[0], port, m.memctl._engine):
        assert not _contains_secret(repr(obj), secrets)
    dram = b"".join(m.dram.read(pa, 4096) for pa in m.dram.written_pages())
    assert not any(k in dram for k in secrets)


def test_cli_outputs_expose_no_keys(created_keys):
    keys = created_keys
    profile = get_profile("rome").with_(seed=None, dram_size=1 << 32)
    # The attacks part is scanned for keys by tests/test_leakscan.py (outputs included).
    outputs = [repr(describe(profile)), repr(run_demo(profile, attacks=False).to_json())]
    assert keys
    assert not any(_contains_secret(out, keys) for out in outputs)
