"""The command line: exit codes, JSON output, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sevsim.cli import main


def run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_info_json_decodes_cpuid(capsys):
    code, out, _ = run(["info", "--profile", "milan", "--json"], capsys)
    data = json.loads(out)
    assert code == 0
    leaf = data["cpuid"]["0x8000001f"]
    assert leaf["eax"] == "0x0101fd3f" and leaf["ebx"] == "0x00004173"
    assert (leaf["c_bit"], leaf["phys_addr_reduction"], leaf["num_vmpl"]) == (51, 5, 4)
    assert "HwEnforcedCacheCoh" in leaf["features"]
    assert data["derived"]["effective_phys_bits"] == 43
    assert data["derived"]["reserved_pte_address_bits"] == [43, 50]
    assert data["msr"]["SYSCFG"]["mem_encryption_mod_en"] is True
    assert data["msr"]["SEV_STATUS"]["value"] == "0x00000000"


def test_info_reflects_bios_options(capsys):
    code, out, _ = run(["info", "--profile", "rome", "--no-smee", "--tsme", "--json"], capsys)
    data = json.loads(out)
    assert code == 0
    assert data["msr"]["SYSCFG"]["mem_encryption_mod_en"] is False
    assert data["derived"]["effective_phys_bits"] == 48 and data["derived"]["tsme"] is True


def test_info_table_and_all(capsys):
    code, out, _ = run(["info", "--profile", "naples"], capsys)
    assert code == 0 and "C-bit" in out and "47" in out
    code, out, _ = run(["info", "--all"], capsys)
    assert code == 0 and all(n in out for n in ("naples", "rome", "milan", "genoa"))


@pytest.mark.parametrize(
    "args",
    [
        ["info", "--profile", "zen9"],
        ["demo", "--seed", "abc"],
        ["bench", "--rounds", "3"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, capsys):
    code, out, err = run(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("sevsim")
    assert "Traceback" not in err + out


def test_help_everywhere(capsys):
    for args in ([], ["--help"], ["demo", "--help"], ["info", "--help"], ["bench", "--help"]):
        code, out, _ = run(args, capsys)
        assert code == 0 and "Usage" in out


def test_demo_passes_every_check(tmp_path, capsys):
    """The whole demo, once (it takes most of a minute): every check, the views, the ASID
    table, the attacks part and the report."""
    code, out, err = run(["demo", "--seed", "7", "--json", "--report", str(tmp_path / "r")], capsys)
    data = json.loads(out)
    assert code == 0 and data["ok"]
    titles = [s["title"] for s in data["steps"]]
    attacks = [t for t in titles if t.startswith("Attack: ")]
    assert len(attacks) == 11
    assert "report written to" in err
    report = (tmp_path / "r" / "report.md").read_text()
    assert "![the classic picture](classic.png)" in report and "![key domains](keys.png)" in report
    assert all(t in report for t in titles)
    assert report.count("✔") == sum(len(s["checks"]) for s in data["steps"])
    from PIL import Image

    with Image.open(tmp_path / "r" / "classic.png") as img:
        assert img.size == (5 * 256 + 4 * 8, 256 + 18)
    checks = [c for s in data["steps"] for c in s["checks"]]
    assert len(checks) >= 15 and all(c["ok"] for c in checks)
    views = {v["label"]: v for s in data["steps"] for v in s["views"]}
    secret = views["secret"]
    assert bytes.fromhex(secret["cpu_reads"]).startswith(b"TOP SECRET")
    assert b"TOP SECRET" not in bytes.fromhex(secret["dram_holds"])
    # The SEV part (real-code guests): the guest reads its secret, hypervisor and DRAM do not.
    alpha = views["alpha's secret"]
    guest_reads = bytes.fromhex(alpha["cpu_reads"])
    assert guest_reads.startswith(b"sevsim secret:") and len(guest_reads) == 46
    assert bytes.fromhex(alpha["host_reads"]) != guest_reads
    assert bytes.fromhex(alpha["dram_holds"]) != guest_reads
    plain = views["plain's secret"]
    assert bytes.fromhex(plain["host_reads"]) == bytes.fromhex(plain["cpu_reads"])
    all_tables = [t for s in data["steps"] for t in s["tables"]]
    tables = [t for t in all_tables if "moment" in t["rows"][0]]  # the ASID tables
    moments = [r["moment"] for t in tables for r in t["rows"] if r["moment"]]
    assert any("WBINVD_REQUIRED" in m for m in moments)
    reused = [r for r in tables[-1]["rows"] if r["guest"] == "gamma"]
    assert reused and reused[0]["ASID"] == next(
        r["ASID"] for r in tables[0]["rows"] if r["guest"] == "alpha"
    )
    # The SEV-ES step: the hypervisor reads the SEV guest's RIP, and the SEV-ES guest's reset RIP.
    registers = next(t for t in all_tables if t["title"].startswith("what the hypervisor reads"))
    rip = next(r for r in registers["rows"] if r["register"] == "RIP")
    assert rip["SEV-ES guest"] == "0xfff0" and rip["SEV guest"] == rip["SEV-ES VMSA, under its key"]


def test_demo_parts(capsys):
    code, out, _ = run(["demo", "--sev", "--seed", "7", "--json"], capsys)
    titles = [s["title"] for s in json.loads(out)["steps"]]
    assert code == 0 and len(titles) == 5 and "ASIDs" in titles[2] and "SEV-ES" in titles[4]
    code, _, err = run(["demo", "--sev", "--tsme"], capsys)
    assert code == 2 and "one at most" in err
    code, out, _ = run(["demo", "--attest", "--seed", "7", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["ok"] and len(data["steps"]) == 4
    console = data["steps"][3]["facts"]["guest console"]
    assert "HMAC(secret" in console


def test_demo_io_part(capsys):
    code, out, _ = run(["demo", "--io", "--seed", "7", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["ok"] and len(data["steps"]) == 3
    views = {v["label"]: v for s in data["steps"] for v in s["views"]}
    buffer = views["the guest's data buffer"]
    assert bytes.fromhex(buffer["cpu_reads"]).startswith(b"sevsim guest disk, seed")
    assert b"sevsim" not in bytes.fromhex(buffer["host_reads"])
    # The hypervisor reads the bounce buffer in the clear; DRAM holds it under the host key.
    bounce = views["a bounce buffer, as the hypervisor finds it in the pool"]
    assert bytes.fromhex(bounce["cpu_reads"]).startswith(b"sevsim guest disk, seed")
    assert b"sevsim" not in bytes.fromhex(bounce["dram_holds"])
    dma = views["the guest's page after the device wrote to it"]
    assert bytes.fromhex(dma["dram_holds"]).startswith(b"written by a device")
    assert bytes.fromhex(dma["cpu_reads"]) != bytes.fromhex(dma["dram_holds"])


def test_demo_renders_for_people():
    """The human rendering (panels, consoles, tables) of two parts; the whole story is
    checked through --json above, on one run."""
    texts = []
    for part in ("--tsme", "--sev"):
        out = subprocess.run(
            [sys.executable, "-m", "sevsim", "demo", part, "--profile", "rome", "--seed", "1"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert "checks passed" in out.stdout and "Traceback" not in out.stderr
        texts.append(out.stdout)
    assert "TSME" in texts[0]
    assert "hypervisor" in texts[1] and "sevsim-guest: booting" in texts[1]  # a console


def test_demo_shows_each_step_while_it_runs():
    """The first step's panel reaches a pipe while the process is still running: the demo
    streams its steps instead of printing them all at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sevsim", "demo", "--sev", "--seed", "7"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines, running_at_first_title = [], None
    for line in proc.stdout:  # line by line, as it arrives
        lines.append(line)
        if running_at_first_title is None and "1. Start two SEV guests" in line:
            running_at_first_title = proc.poll() is None
    err = proc.stderr.read()
    assert proc.wait() == 0, err
    assert running_at_first_title is True
    assert "4. " in "".join(lines) and "checks passed" in lines[-1]
    assert err == ""  # no progress line when stderr is not a terminal


def test_demo_prints_a_step_before_running_the_next(monkeypatch, capsys):
    """Each step is on stdout before the next one starts; --json prints one document, once,
    at the end; the exit code follows the checks."""
    import importlib

    from sevsim.demo import Step, Working

    demo_cli = importlib.import_module("sevsim.cli.demo")  # the module, not the command

    seen = []

    def fake_steps(profile, **parts):
        yield Working("the first")
        first = Step("The first step", "one")
        first.check("it holds", True)
        yield first
        seen.append(capsys.readouterr().out)  # what was printed before step 2 ran
        yield Working("the second")
        second = Step("The second step", "two")
        second.check("it fails", False)
        yield second

    monkeypatch.setattr(demo_cli, "demo_steps", fake_steps)
    code, out, err = run(["demo"], capsys)
    assert "1. The first step" in seen[0] and "The second step" not in seen[0]
    assert code == 1 and "2. The second step" in out and "1 of 2 checks failed" in out
    seen.clear()
    code, out, err = run(["demo", "--json"], capsys)
    assert seen == [""] and code == 1
    assert [s["title"] for s in json.loads(out)["steps"]] == ["The first step", "The second step"]


def test_the_demo_leaves_nothing_in_the_kds_cache(tmp_path, monkeypatch, capsys):
    """~/.local/share/sevsim/kds does not grow run after run: the demo's platforms are
    throwaway chips, known to the simulated KDS only while they exist."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SEVSIM_DATA", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    kds = tmp_path / ".local" / "share" / "sevsim" / "kds"

    def cached() -> list[str]:
        return sorted(p.name for p in kds.iterdir()) if kds.exists() else []

    rounds = []
    for _ in range(2):
        for part in ("--sev", "--migrate"):  # migrate: two platforms, one exports its chain
            code, out, _ = run(["demo", part, "--seed", "7", "--json"], capsys)
            assert code == 0 and json.loads(out)["ok"]
        rounds.append(cached())
    assert rounds[1] == rounds[0] == []
    assert (tmp_path / ".local" / "share" / "sevsim" / "amd-sim-root").is_dir()  # made once


def test_bench_quick_json(capsys):
    code, out, _ = run(["bench", "--quick", "--json"], capsys)
    data = json.loads(out)
    assert code == 0
    for key in (
        "bulk_encrypt_ratio",
        "bulk_decrypt_ratio",
        "bulk_encrypt_gbps",
        "load_ratio",
        "loads_per_s",
        "guest_load_ratio",
        "guest_loads_per_s",
        "launch_ratio",
        "command_us",
        "page_crypto_us",
        "migrate_ratio",
        "migrate_overlap",
        "bounce_io_ratio",
        "es_exit_ratio",
        "sev_cpuid_us",
        "es_cpuid_us",
        "sparse_rss_mib",
        "touched_mib",
    ):
        assert data[key] > 0
    assert data["send_page_total_us"] > data["page_crypto_us"]
    # The quick migration's 64 MiB guest wrote its 30 MiB above 34 MiB: all of it was sent.
    assert data["migrate_bytes"] >= 30 << 20
    assert data["touched_mib"] == 8
    assert data["bounce_io_bytes"] == 4 << 20
    assert len(data["bounce_io_rounds_ms"]["guest"]) == 2
    assert set(data["targets_met"]) == set(data["targets"])
