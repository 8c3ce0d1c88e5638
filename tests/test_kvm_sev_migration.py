"""KVM_SEV_SEND_UPDATE_DATA and KVM_SEV_RECEIVE_UPDATE_DATA as Linux has them
(arch/x86/kvm/svm/sev.c): at most one guest page per command, a range that crosses a page
boundary refused with EINVAL before the firmware is asked, and the length query."""

from __future__ import annotations

import errno

import pytest

from sevsim.api import commands as cmd
from sevsim.host.kvm.uapi import KvmError
from sevsim.host.migration import TargetChain
from sevsim.profiles import get_profile
from sevsim.system import HostSystem

MEMORY = 4 << 20
PAGE = 4096
GPA = 0x10000


@pytest.fixture(scope="module")
def system():
    with HostSystem.start(get_profile("milan").with_(seed=16, dram_size=1 << 30)) as system:
        yield system


@pytest.fixture(scope="module")
def moving(system):
    """(sender in SEND_START's state, receiver after RECEIVE_START), both on one platform."""
    own = TargetChain.from_chain(system.export_chain(full=True).encode(full=True))
    src = system.kvm.create_vm(MEMORY, sev=True, name="src")
    src.write(GPA, bytes(range(256)) * 32)
    src.sev_launch_start(0)
    src.sev_launch_update_data(0, MEMORY)
    src.sev_launch_measure()
    src.sev_launch_finish()
    session, policy = src.sev_send_start(own.pdh, own.plat_certs, own.amd_certs)
    dst = system.kvm.create_vm(MEMORY, sev=True, name="dst")
    dst.sev_receive_start(own.pdh, session, policy)
    yield src, dst
    src.sev_send_cancel()
    src.destroy()
    dst.destroy()


def commands(system) -> int:
    return system.platform.mailbox.commands_completed


@pytest.mark.parametrize(
    ("gpa", "length"),
    [(GPA, 2 * PAGE), (GPA + 16, PAGE), (GPA + PAGE - 16, 32), (GPA, 0)],
    ids=["two pages", "one page, crossing", "32 bytes, crossing", "empty"],
)
def test_send_refuses_more_than_a_page_without_asking_the_firmware(system, moving, gpa, length):
    src, _ = moving
    before = commands(system)
    with pytest.raises(KvmError) as refused:
        src.sev_send_update_data(gpa, length)
    assert refused.value.errno == errno.EINVAL and refused.value.status is None
    assert commands(system) == before


@pytest.mark.parametrize(
    ("gpa", "length"),
    [(GPA, 2 * PAGE), (GPA + 16, PAGE), (GPA + PAGE - 16, 32)],
    ids=["two pages", "one page, crossing", "32 bytes, crossing"],
)
def test_receive_refuses_more_than_a_page_without_asking_the_firmware(system, moving, gpa, length):
    _, dst = moving
    before = commands(system)
    with pytest.raises(KvmError) as refused:
        dst.sev_receive_update_data(bytes(cmd.PACKET_HEADER.size), bytes(length), gpa)
    assert refused.value.errno == errno.EINVAL and refused.value.status is None
    assert commands(system) == before


def test_one_page_and_a_part_of_one_go_through(system, moving):
    src, dst = moving
    for gpa, length in ((GPA, PAGE), (GPA + PAGE - 32, 32)):
        before = commands(system)
        header, data = src.sev_send_update_data(gpa, length)
        assert commands(system) == before + 1  # one SEND_UPDATE_DATA
        assert len(header) == cmd.PACKET_HEADER.size and len(data) == length
        dst.sev_receive_update_data(header, data, gpa + PAGE)
        assert commands(system) == before + 2  # one RECEIVE_UPDATE_DATA
    # The receiver holds the sender's plaintext (both guests allow debugging).
    assert dst.sev_dbg_decrypt(GPA + PAGE, PAGE) == bytes(range(256)) * 16
    assert dst.sev_dbg_decrypt(2 * PAGE + GPA - 32, 32) == (bytes(range(256)) * 16)[-32:]


def test_the_length_query_asks_the_firmware_for_the_header_size(system, moving):
    src, _ = moving
    before = commands(system)
    # The firmware answers an empty buffer with INVALID_LENGTH and the header size only.
    assert src.sev_send_update_data_query_lengths() == (cmd.PACKET_HEADER.size, 0)
    assert commands(system) == before + 1
