"""The mailbox fuzzer: a CI-sized campaign, and proof that its checks catch real faults."""

from __future__ import annotations

import json

import pytest

from sevsim.api.commands import Command
from sevsim.api.status import Status
from sevsim.cli import main
from sevsim.fuzz import MailboxFuzzer


@pytest.mark.parametrize("seed", [11, 12])
def test_a_few_thousand_hostile_commands_break_no_invariant(seed):
    fuzzer = MailboxFuzzer(seed=seed)
    try:
        report = fuzzer.run(2000)
    finally:
        fuzzer.close()
    assert report.violations == []
    assert report.cases == 2000
    # It reaches deep: many command ids, successes and the spec's refusals alike.
    assert len(report.commands) > 100
    for status in (
        Status.SUCCESS,
        Status.INVALID_COMMAND,
        Status.INVALID_GUEST,
        Status.INVALID_ADDRESS,
    ):
        assert report.statuses[status] > 0


def test_the_checker_catches_an_internal_error_and_a_wrong_guest_change():
    from sevsim.api import commands as cmd

    fuzzer = MailboxFuzzer(seed=13)
    try:
        world = fuzzer.world
        psp = world.psp

        def buggy(buf):  # a firmware bug: other guests lose their ASID, then an exception
            for guest in psp.guests():
                if guest.handle != buf.handle:
                    guest.asid = 0
            raise KeyError("bug")

        psp.replace_handler(Command.GUEST_STATUS, buggy)
        kernel = world.system.kernel
        buffer = cmd.GUEST_STATUS.build(handle=world.debuggable.handle)
        address = kernel.pa(world.cmd_page) | kernel.me_mask
        fuzzer._case = lambda: (int(Command.GUEST_STATUS), buffer, address, False)
        fuzzer.one()
        found = " ".join(fuzzer.report.violations)
        assert "command 0x23: internal error 0x23: KeyError" in found
        assert "command 0x23: the sentinel guest changed" in found
    finally:
        fuzzer.close()


def test_fuzz_command_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fuzz", "mailbox", "--cases", "300", "--seed", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert exc.value.code in (0, None) and out["cases"] == 300 and out["violations"] == []


def test_asid_load_recycles_without_activating_a_dirty_asid():
    from sevsim.fuzz import asid_load

    out = asid_load(24, alive=3, asids=4, seed=5)  # each guest boots real code: few of them
    assert out["violations"] == []
    assert out["activations"] == 24
    # Four ASIDs, three alive: the pool runs dry again and again; each refill is a recycle.
    assert out["recycles"] >= 24 // 4 - 1
    assert out["rss_mib_at_end"] <= out["rss_mib_after_warmup"] + 20
