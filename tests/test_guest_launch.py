"""The real-code guest's launch part on sevsim's engine (src/sevsim/guest/x86: ovmf.c,
fw_cfg.c, launch.c, count.c): its footer table, fw_cfg DMA through a shared bounce buffer,
HMAC-SHA256 against RFC 4231, and the count workload's pages as the host sees them.
The VMM flows (measured boot, secrets, migration) are in test_vmm and test_migration."""

from __future__ import annotations

import re

import pytest

from sevsim.api import fwcfg, ovmf
from sevsim.guest import x86 as x86_guest
from sevsim.profiles import get_profile
from sevsim.system import HostSystem

# RFC 4231, section 4: HMAC-SHA-256 of test cases 1-4, 6 and 7.
RFC4231 = {
    1: "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
    2: "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    3: "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
    4: "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
    6: "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
    7: "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
}
SYMBOLS = x86_guest.symbols()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    system = HostSystem.start(
        get_profile("milan").with_(seed=21, dram_size=1 << 30), tmp_path_factory.mktemp("s")
    )
    yield system
    system.close()


def lines(vm) -> list[str]:
    return [ln[len("sevsim-guest: ") :] for ln in vm.console_text().splitlines()]


def test_the_footer_table_is_in_the_last_page_in_ovmfs_format():
    image = x86_guest.image()
    table = ovmf.parse_table(image)
    assert set(table) == {
        ovmf.SEV_SECRET_GUID,
        ovmf.SEV_HASH_TABLE_RV_GUID,
        ovmf.SEV_ES_RESET_BLOCK_GUID,
    }
    # The SEV-ES APs' start: real-mode code in the image, reached with CS.base 0xFFFF0000
    # and IP = its low 16 bits (QEMU's sev_es_set_reset_vector); it far-jumps (EA ptr16:16)
    # to the trampoline at 0800:0000.
    reset = ovmf.reset_address(table)
    assert reset == SYMBOLS["sev_es_ap_reset"]
    assert reset & 0xFFFF_0000 == ovmf.flash_base(len(image))
    assert image[reset - ovmf.flash_base(len(image)) :][:5] == bytes.fromhex("ea00000008")
    assert SYMBOLS["TRAMPOLINE_GPA"] == 0x0800 << 4
    secret, hashes = (
        ovmf.area(table, ovmf.SEV_SECRET_GUID),
        ovmf.area(table, ovmf.SEV_HASH_TABLE_RV_GUID),
    )
    assert secret == (SYMBOLS["SEV_LAUNCH_SECRET_GPA"], 0xC00)
    assert hashes == (SYMBOLS["QEMU_HASH_TABLE_GPA"], 0x400)
    assert secret[0] + secret[1] == hashes[0]  # OVMF AmdSev: one page, secret then hashes
    # Both lie in RAM the guest needs anyway, clear of every other fixed range.
    assert hashes[0] + hashes[1] <= x86_guest.MIN_MEMORY
    mem_loop = SYMBOLS["MEM_LOOP_GPA"]
    assert hashes[0] + hashes[1] <= mem_loop and mem_loop + (8 << 20) <= x86_guest.MIN_MEMORY
    assert ovmf.FOUR_GB - 4096 <= SYMBOLS["ovmf_table"] < ovmf.FOUR_GB - ovmf.TAIL
    assert SYMBOLS["real_start"] < ovmf.FOUR_GB - 4096  # the real-mode code is below


def test_hmac_sha256_matches_rfc_4231(host):
    vm = host.start_x86_guest("hmac", "hmac-selftest", sev=False)
    assert vm.run()[0].reason == "DONE"
    found = dict(
        (int(n), mac)
        for n, mac in re.findall(r"hmac-sha256 rfc4231 case (\d) (\w+)", vm.console_text())
    )
    assert found == RFC4231
    vm.destroy()


def test_fw_cfg_dma_goes_through_the_shared_bounce_buffer(host):
    """Under SEV the guest shares the 16 pages at 0x210000 (KVM_HC_MAP_GPA_RANGE) and
    reads by DMA through them: the host finds its last descriptor and data there."""
    vm = host.start_x86_guest("dma", "alu:10", sev=True)
    assert vm.run()[0].reason == "DONE"
    assert "workload alu:10" in lines(vm)
    bounce = 0x21_0000
    shared = [args[:3] for nr, args in vm.hypercalls if nr == 12]  # KVM_HC_MAP_GPA_RANGE
    assert [(bounce + i * 4096, 1, 0) for i in range(16)] == shared[:16]
    control, length, address = fwcfg.DMA_DESCRIPTOR.unpack(vm.read(bounce, 16))
    assert (control, length, address) == (0, len("alu:10"), bounce + 4096)  # done, no error
    assert vm.read(bounce + 4096, 6) == b"alu:10"  # the last item read: the workload file
    vm.destroy()


def test_count_to_a_limit_publishes_in_its_shared_page_only(host):
    vm = host.start_x86_guest("count", "count:8192", sev=True)
    assert vm.run(max_rounds=100)[0].reason == "DONE"
    out = lines(vm)
    assert "counting in private memory at 0x220000; status in shared page 0x221000" in out
    assert out[-2:] == ["count 8192", "done"]
    status = vm.read(0x22_1000, 32)
    assert status == b"count 8192".ljust(32, b"\0")  # the host reads the shared page
    counter = vm.read(0x22_0000, 16)
    assert (8192).to_bytes(8, "little") not in counter  # and only ciphertext of the counter
    vm.destroy()


def test_the_guest_refuses_too_little_ram(host):
    vm = host.start_x86_guest("small", "secret", memory=16 << 20, sev=False)
    assert vm.run()[0].reason == "DONE"
    assert lines(vm)[-1] == "16 MiB of RAM: the guest needs at least 32 MiB"
    vm.destroy()
