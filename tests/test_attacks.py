"""The attack lab: each attack's outcome, and its mitigation where the model has one."""

from __future__ import annotations

import json

import pytest

from sevsim.attacks import ATTACKS
from sevsim.attacks.lab import (
    SECRET_GPA,
    SECRET_SIZE,
    RawGuestMemory,
    is_secret,
    published_digest,
    start_victim,
)
from sevsim.attacks.physical import ColdBootDump, guest_secret_in
from sevsim.cli import main
from sevsim.profiles import get_profile
from sevsim.system import HostSystem


def run(name: str, profile: str = "milan", **changes):
    return ATTACKS[name].run(get_profile(profile).with_(seed=5, **changes))


def test_host_read_gets_ciphertext_and_debug_only_with_the_owners_consent():
    r = run("host-read")
    debuggable, nodbg = r.figures["debuggable"], r.figures["nodbg"]
    # Its own mapping and a raw one give the hypervisor ciphertext only.
    for case in (debuggable, nodbg):
        assert not case["mapping_reads_plaintext"] and not case["raw_reads_plaintext"]
    # DBG_DECRYPT works when the policy allows it ...
    assert debuggable["dbg_decrypt"] == "SUCCESS" and debuggable["secret_recovered"]
    assert any("DBG_DECRYPT → SUCCESS: b'sevsim secret:' + " in s for s in r.steps)
    # ... and NODBG is the mitigation.
    assert nodbg["dbg_decrypt"] == "POLICY_FAILURE" and not nodbg["secret_recovered"]
    assert not r.succeeded


def test_raw_guest_memory_is_the_dram_ciphertext():
    with HostSystem.start(get_profile("milan").with_(seed=2)) as system:
        vm = start_victim(system, "g", policy=0)
        vm.run()
        raw = RawGuestMemory(system, vm, SECRET_GPA).read(0, SECRET_SIZE)
        assert raw == system.machine.dram.read(vm.spa(SECRET_GPA), SECRET_SIZE)
        # ... which is not the secret the guest keeps there (and a debugger reads).
        digest = published_digest(vm)
        assert is_secret(vm.sev_dbg_decrypt(SECRET_GPA, SECRET_SIZE), digest)
        assert not is_secret(raw, digest)


def test_a_dump_of_a_machine_without_encryption_shows_a_guests_secret():
    """The control for cold-boot: the search finds the secret of a guest that has no key."""
    profile = get_profile("milan").with_(seed=3, tsme=False)
    with HostSystem.start(profile, cmdline="mem_encrypt=off") as system:
        vm = system.start_x86_guest("plain", "secret", sev=False)
        vm.run()
        system.kernel.wbinvd_on_all_cpus()
        assert guest_secret_in(ColdBootDump(system.machine), vm)


@pytest.mark.parametrize("profile", ["naples", "milan"])
def test_cold_boot_reads_only_the_unencrypted_machine(profile):
    r = run("cold-boot", profile)
    found = r.figures["found"]
    assert found["no encryption"] == {"host": True}
    assert found["SME"] == {"host": False}
    assert found["TSME"] == {"host": False}
    assert found["SME + SEV guest"] == {"host": False, "guest": False}
    assert not r.succeeded


def test_wrong_asid_crashes_without_disclosure():
    r = run("wrong-asid")
    assert r.figures["crashed"] and set(r.figures["exits"].values()) == {"SHUTDOWN"}
    assert not r.figures["secret_seen"] and not r.succeeded


@pytest.mark.parametrize("engine", ["xe", "xex"])
def test_replay_makes_the_guest_read_its_old_balance(engine):
    r = run("replay", engine_mode=engine)
    assert r.figures["ciphertext_changed_with_the_value"]
    assert r.figures["guest_read"] == "balance: 100 EUR"
    assert r.succeeded


def test_the_balance_victim_reads_its_own_payment_when_left_alone():
    """The control experiment: without the replay the real-code guest reads 40."""
    with HostSystem.start(get_profile("milan").with_(seed=4)) as system:
        vm = system.start_x86_guest("victim", "balance")
        assert [e.reason for e in vm.run()] == ["DONE"]
        assert "sevsim-guest: balance read back: balance:  40 EUR" in vm.console_text()


def test_ciphertext_side_channel_recovers_the_key_up_to_one_bit_of_guessing():
    r = run("ciphertext-side-channel")
    f = r.figures
    assert f["observations"] == 16 and f["distinct_ciphertexts"] == 2
    inverse = f["recovered"].translate(str.maketrans("01", "10"))
    assert f["key"] in (f["recovered"], inverse) and f["bits_recovered"] == 16
    assert r.succeeded


def test_cache_alias_corrupts_only_without_the_flush_and_without_coherency():
    naples = run("cache-alias", "naples")
    assert naples.figures["corrupted_lines"] == {"without flush": 64, "with flush": 0}
    assert naples.succeeded
    milan = run("cache-alias", "milan")  # HwEnforcedCacheCoh
    assert milan.figures["hw_enforced_cache_coherency"]
    assert milan.figures["corrupted_lines"] == {"without flush": 0, "with flush": 0}
    assert not milan.succeeded


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_attack_command_line(capsys):
    code, out, _ = _cli(["attack", "--list"], capsys)
    assert code == 0 and all(name in out for name in ATTACKS)
    code, out, _ = _cli(["attack", "replay", "--seed", "1", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["attack"] == "replay" and data["succeeded"] is True
    assert {"mitigated_by", "figures", "steps", "explanation"} <= set(data)
    code, out, _ = _cli(["attack", "wrong-asid", "--profile", "rome"], capsys)
    assert code == 0 and "Mitigated by" in out and "SHUTDOWN" in out
    code, _, err = _cli(["attack", "bogus"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("profile", ["milan", "naples"])
def test_crossline_exec_runs_the_victims_own_load_to_decrypt_its_secret(profile):
    """Variant 2 with real code: the attacker's VM, with the victim's ASID, executes the
    victim's `mov (%rdi,%rcx,8),%r8` over the victim's page; RAX after the #NPF holds the
    plaintext, 8 bytes per VMRUN."""
    r = run("crossline-exec", profile)
    f = r.figures
    assert f["exits"] == ["NPF"] * 6 and f["bytes_recovered"] == 48
    assert f["marker_recovered"] and f["secret_recovered"] and r.succeeded
    assert any("mov (%rdi,%rcx,8),%r8" in step for step in r.steps)


@pytest.mark.parametrize("profile", ["milan", "naples"])
def test_crossline_dumps_the_victims_real_page_tables(profile):
    r = run("crossline", profile)
    f = r.figures
    # PML4 -> PDPT -> its four PDs -> the 4 KiB table of the split 2 MiB page at 0x200000:
    # every pointer leaks, and each leaked address is the one in the victim's own table
    # (read with DBG_DECRYPT to judge).
    assert f["table_pages_dumped"] == 1 + 1 + 4 + 1
    assert f["table_entries_matching"] == 1 + 4 + 1 + 512
    assert f["table_entries_wrong"] == 0 and f["table_entries_missed"] == 0
    # The PDs' other entries are 2 MiB leaves: PS is reserved in a PML4E, so they fault.
    assert f["large_page_entries_not_leakable"] == 4 * 512 - 1
    assert f["vmruns"] == 512 * f["pages_dumped"]
    assert r.succeeded


def test_cipher_move_plants_the_chosen_block_unless_tweaks_are_random_per_boot():
    xe = run("cipher-move", engine_mode="xe")
    assert bytes.fromhex(xe.figures["guest_read"]) == b"role: admin".ljust(16)
    assert xe.succeeded
    # xex with this boot's random tweaks: the same move decrypts to garbage.
    xex = run("cipher-move", engine_mode="xex")
    read = bytes.fromhex(xex.figures["guest_read"])
    assert read not in (b"role: admin".ljust(16), b"role: user".ljust(16))
    assert not xex.succeeded and xex.figures["tweak"] == "per boot"
    # xex with a fixed tweak the attacker recovered (Zen 1 parts): one XOR more and it works.
    fixed = run("cipher-move", engine_mode="xex", xex_fixed_tweak=True)
    assert bytes.fromhex(fixed.figures["guest_read"]) == b"role: admin".ljust(16)
    assert fixed.succeeded


def test_the_inbox_victim_keeps_its_setting_when_left_alone():
    with HostSystem.start(get_profile("milan").with_(seed=4, engine_mode="xe")) as system:
        vm = start_victim(system, "victim", "inbox")
        assert [e.reason for e in vm.run()] == ["DONE"]
        assert "sevsim-guest: setting: role: user" in vm.console_text().splitlines()


def test_io_tamper_sees_and_alters_clear_io_and_only_tags_detect_it():
    r = run("io-tamper")
    clear, xts, tagged = r.figures["clear"], r.figures["xts"], r.figures["xts+hmac"]
    assert all(case["tampered"] for case in (clear, xts, tagged))
    assert clear["host_saw_plaintext"] and clear["guest_read_altered_data"]
    assert not clear["detected"]
    assert not xts["host_saw_plaintext"] and xts["guest_read_altered_data"]
    assert not xts["detected"]  # XTS: garbage, silently
    assert not tagged["host_saw_plaintext"] and tagged["detected"]  # the mitigation
    assert "integrity check failed for 1 block(s), first at sector 8" in tagged["guest_error"]
    assert r.succeeded


def test_register_state_reads_an_sev_guests_secret_through_its_registers_but_not_an_es_one():
    """SEV: at an exit the VMCB and KVM show the guest's registers, and steering RIP, RDI and
    RFLAGS.TF makes the guest's own load hand over its secret byte by byte. SEV-ES: the same
    VMRUNs resume the guest from its VMSA, the GHCB shows only the last request, and a write
    into the VMSA's ciphertext shuts the guest down."""
    r = run("register-state")
    sev, es = r.figures["SEV"], r.figures["SEV-ES"]
    assert sev["secret_recovered"] and sev["bytes_recovered"] == SECRET_SIZE and r.succeeded
    assert sev["gprs_seen"] > 5 and sev["vmcb_cr3"] != "0x0"
    assert es["bytes_recovered"] == 0 and not es["secret_recovered"]
    assert es["vmcb_rip"] == "0xfff0" and es["vmcb_cr3"] == "0x0"  # KVM's pre-launch state
    assert es["gprs_seen"] == 1  # RDX, the signature KVM set at reset
    assert es["tampered_vmsa_exit"] == "SHUTDOWN"
    assert "rbx" not in es["ghcb_fields"]  # the GHCB holds what the guest chose to show


def test_register_state_on_a_part_without_sev_es_stages_only_the_sev_guest():
    r = run("register-state", "naples")
    assert r.succeeded and list(r.figures) == ["SEV"]
