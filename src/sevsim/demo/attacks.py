"""The attack part of the demo: each of the attack lab's attacks, staged, with what the
architecture says must happen checked (sevsim.attacks; `sevsim attack NAME` runs one)."""

from __future__ import annotations

from collections.abc import Callable

from sevsim.attacks import ATTACKS, AttackResult
from sevsim.demo.steps import Step, Story, Working
from sevsim.profiles import MachineProfile

Expect = Callable[[AttackResult, Step], None]


def _host_read(r: AttackResult, s: Step) -> None:
    s.check(
        "the hypervisor's mappings give ciphertext", not r.figures["nodbg"]["raw_reads_plaintext"]
    )
    s.check(
        "DBG_DECRYPT works only with the owner's debug policy",
        r.figures["debuggable"]["secret_recovered"],
    )
    s.check(
        "NODBG: the firmware refuses (POLICY_FAILURE)",
        r.figures["nodbg"]["dbg_decrypt"] == "POLICY_FAILURE",
    )


def _cold_boot(r: AttackResult, s: Step) -> None:
    found = r.figures["found"]
    s.check("without encryption the dump shows the host's secret", found["no encryption"]["host"])
    s.check("with SME, TSME or SEV it shows nothing", not r.succeeded)


def _wrong_asid(r: AttackResult, s: Step) -> None:
    s.check("both guests crash (SHUTDOWN)", r.figures["crashed"])
    s.check("nothing of either secret reaches the hypervisor", not r.figures["secret_seen"])


def _crossline(r: AttackResult, s: Step) -> None:
    f = r.figures
    s.check(
        "every leaked entry is the victim's real page-table entry", f["table_entries_wrong"] == 0
    )
    s.check("the victim's page tables leak before the crash", f["table_entries_matching"] > 512)


def _cipher_move(r: AttackResult, s: Step) -> None:
    if r.engine == "xe":
        s.check("xe: the guest reads the block the hypervisor chose", r.succeeded)
    else:
        s.check("xex: the moved block decrypts to garbage", not r.succeeded)


def _replay(r: AttackResult, s: Step) -> None:
    s.check("the guest reads its old balance (no integrity in SEV)", r.succeeded)


def _register_state(r: AttackResult, s: Step) -> None:
    sev = r.figures["SEV"]
    s.check("SEV: steering RIP, RDI and TF hands the secret over byte by byte", r.succeeded)
    if "SEV-ES" in r.figures:
        es = r.figures["SEV-ES"]
        s.check("SEV-ES: the same VMRUNs recover nothing", es["bytes_recovered"] == 0)
        s.check(
            "SEV-ES: a write into the VMSA ends in SHUTDOWN", es["tampered_vmsa_exit"] == "SHUTDOWN"
        )
    s.check("SEV: the VMCB holds the guest's CR3", sev["vmcb_cr3"] != "0x0")


def _side_channel(r: AttackResult, s: Step) -> None:
    s.check("two ciphertexts for two flag values: the key's bits, undecrypted", r.succeeded)


def _io_tamper(r: AttackResult, s: Step) -> None:
    s.check("clear I/O: the host reads it and its change goes unnoticed", r.succeeded)
    s.check(
        "XTS: ciphertext only, but the change still goes unnoticed",
        not r.figures["xts"]["detected"],
    )
    s.check(
        "XTS + HMAC tags: the guest refuses the changed block", r.figures["xts+hmac"]["detected"]
    )


def _cache_alias(r: AttackResult, s: Step) -> None:
    lines = r.figures["corrupted_lines"]
    if r.figures["hw_enforced_cache_coherency"]:
        s.check(
            "HwEnforcedCacheCoh: no corruption even without the flush", lines["without flush"] == 0
        )
    else:
        s.check("without the flush the stale lines corrupt the page", lines["without flush"] > 0)
    s.check("with Linux's flush the page is intact", lines["with flush"] == 0)


EXPECTED: dict[str, Expect] = {
    "host-read": _host_read,
    "cold-boot": _cold_boot,
    "wrong-asid": _wrong_asid,
    "crossline": _crossline,
    "cipher-move": _cipher_move,
    "replay": _replay,
    "register-state": _register_state,
    "ciphertext-side-channel": _side_channel,
    "io-tamper": _io_tamper,
    "cache-alias": _cache_alias,
}


def attack_story(profile: MachineProfile) -> Story:
    for name, expect in EXPECTED.items():
        runs = [profile]
        if name == "cipher-move":  # both engines: the point is the difference
            runs = [profile.with_(engine_mode="xe"), profile.with_(engine_mode="xex")]
        for run_profile in runs:
            engine = f" ({run_profile.engine_mode})" if len(runs) > 1 else ""
            yield Working(f"staging the attack {name}{engine}")
            r = ATTACKS[name].run(run_profile)
            title = f"Attack: {r.title}" + (f" ({r.engine})" if len(runs) > 1 else "")
            s = Step(title, r.explanation)
            s.facts = [(f"{i}.", text) for i, text in enumerate(r.steps, 1)]
            s.facts.append(
                ("outcome", "the attacker reached its goal" if r.succeeded else "stopped")
            )
            s.facts.append(("mitigated by", r.mitigated_by))
            command = f"sevsim attack {name} --profile {profile.name}"
            if len(runs) > 1:
                command += f" --engine {r.engine}"
            s.facts.append(("command", command))
            expect(r, s)
            yield s
