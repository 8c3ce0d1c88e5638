"""The secret-leak scan: it records real keys, finds a planted one, and finds none."""

from __future__ import annotations

from sevsim.leakscan import LeakScan, scan_scenarios


def test_the_attack_lab_leaks_no_key():
    report = scan_scenarios(parts=("attacks",))
    assert report.hits == []
    for label in ("memory-controller key", "TEK", "TIK", "P-384 private scalar"):
        assert report.keys.get(label, 0) > 0, label
    assert report.machines >= 9 and report.dram_bytes > 50 << 20


def test_the_scan_finds_a_key_that_leaks():
    from sevsim.profiles import get_profile
    from sevsim.system import HostSystem

    scan = LeakScan()
    with scan.recording():
        with HostSystem.start(get_profile("milan").with_(seed=9)) as system:
            vek = next(k for k, label in scan.keys.items() if label == "memory-controller key")
            va = system.kernel.alloc_pages(1)
            system.kernel.write(va, b"oops: " + vek)  # a key where the host can read it
        scan.add_output("a log line", b"key=" + vek.hex().encode())
    hits = scan.finish().hits
    assert any("host memory" in h for h in hits)
    assert any("(encoded) found in a log line" in h for h in hits)
