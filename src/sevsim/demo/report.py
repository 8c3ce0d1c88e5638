"""``sevsim demo --report DIR``: the demo as a Markdown report, with the pictures."""

from __future__ import annotations

from pathlib import Path

from sevsim import pictures
from sevsim.demo import DemoResult
from sevsim.profiles import MachineProfile


def _hex(data: bytes, width: int = 16) -> str:
    lines = []
    for off in range(0, len(data), width):
        chunk = data[off : off + width]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{chunk.hex(' '):<{3 * width}} {text}")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def write_report(result: DemoResult, profile: MachineProfile, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    classic = pictures.classic_panels(profile)
    pictures.side_by_side(classic).save(out / "classic.png")
    system, vms = pictures.scenario(profile)
    try:
        domains = pictures.page_domains(system, vms, 0, system.kernel._next_free >> 12)
    finally:
        system.close()
    pictures.key_map(domains).save(out / "keys.png")
    passed = sum(c.ok for s in result.steps for c in s.checks)
    total = sum(len(s.checks) for s in result.steps)
    md = [
        f"# sevsim demo — profile {result.profile}",
        "",
        f"{passed} of {total} checks passed." + ("" if result.ok else " **Some failed.**"),
        "",
        "## Pictures",
        "",
        "A guest keeps a 256×256 padlock in private memory. From the left: what the guest "
        "reads; DRAM with no encryption; DRAM under the xe engine (Zen 1's tweak); under xe "
        "with t8 = t9 = 0 (a weak tweak, as on early Ryzen firmware: rows repeat in groups "
        "of four); under xex (per-boot random tweaks).",
        "",
        "![the classic picture](classic.png)",
        "",
        "| panel | byte-histogram χ² (noise ≈ 255 ± 23) | blocks equal to the one a row up |",
        "|---|---|---|",
        *(
            f"| {p.label} | {pictures.chi_square(p.data):.0f} | "
            f"{pictures.repeated_blocks(p.data):.3f} |"
            for p in classic
        ),
        "",
        "Key domains of the memory the host has handed out (one square per 4 KiB page):",
        "",
        "![key domains](keys.png)",
        "",
        "| domain | pages |",
        "|---|---|",
        *(f"| {label} | {domains.count(label)} |" for label in dict.fromkeys(domains)),
        "",
    ]
    for number, step in enumerate(result.steps, 1):
        md += [f"## {number}. {step.title}", "", step.explanation, ""]
        if step.facts:
            md += ["| | |", "|---|---|"]
            md += [f"| {_cell(k)} | {_cell(v)} |" for k, v in step.facts]
            md.append("")
        for v in step.views:
            md += [f"**{v.label}** ({v.mapping}, physical address {v.physical_address:#x})", ""]
            shown = [("what the CPU reads", v.cpu_reads)]
            if v.host_reads is not None:
                shown = [("what the guest reads", v.cpu_reads)]
                shown.append(("what the hypervisor reads", v.host_reads))
            shown.append(("what DRAM holds", v.dram_holds))
            for label, data in shown:
                md += [f"{label}:", "", "```", _hex(data), "```", ""]
        for t in step.tables:
            md += [f"**{t.title}**", "", "| " + " | ".join(t.columns) + " |"]
            md.append("|" + "---|" * len(t.columns))
            md += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
            md.append("")
        md += [f"- {'✔' if c.ok else '✘'} {c.what}" for c in step.checks]
        md.append("")
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
