"""``sevsim bench``: speed and memory figures of the silicon model."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sevsim.bench import run_bench
from sevsim.cli.options import json_option


@click.command()
@click.option("--quick", is_flag=True, help="Smaller sizes and fewer rounds (a smoke test).")
@json_option
def bench(quick: bool, as_json: bool) -> int:
    """Measure the model's speed and memory against baselines taken in the same run.

    Ratios compare the model with raw AES-128-ECB (bulk encryption), with a bare
    struct.unpack_from loop (loads on the host and inside an SEV guest), with the bare
    instruction engine (the real-code guest's loops in an SEV guest), with raw ECB plus
    SHA-256 (LAUNCH_UPDATE_DATA + LAUNCH_MEASURE), with the raw crypto two firmwares do
    (a 256 MiB guest migrated page by page between two platform services over loopback),
    and with a plain Python file write (an SEV guest's disk writes through bounce
    buffers). es_exit_ratio is the price of SEV-ES: one CPUID in an SEV-ES guest (#VC, a
    GHCB request, VMGEXIT and back) over one intercepted CPUID in a plain SEV guest. The
    command path is given in microseconds: a PLATFORM_STATUS round trip and a one-page
    SEND_UPDATE_DATA beyond its crypto. RSS growth is compared with the
    memory actually used (a 1 TiB machine; a 4 GiB SEV guest after boot; a service with
    8 guests; each side of the migration). Each figure is the median of several rounds
    (the best round of each side for the disk writes, where page-cache allocation is
    bimodal). Takes about two minutes (about half a minute with --quick). See
    docs/performance.md.
    """
    console = Console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=None)
        result = run_bench(quick=quick, progress=lambda msg: progress.update(task, description=msg))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return 0
    table = Table(title="sevsim bench" + (" (quick)" if quick else ""))
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target")
    met = result["targets_met"]
    for key, fmt in (
        ("bulk_encrypt_ratio", "{:.3f}"),
        ("bulk_decrypt_ratio", "{:.3f}"),
        ("bulk_encrypt_gbps", "{:.2f} GB/s"),
        ("bulk_decrypt_gbps", "{:.2f} GB/s"),
        ("raw_ecb_encrypt_gbps", "{:.2f} GB/s"),
        ("load_ratio", "{:.3f}"),
        ("loads_per_s", "{:,.0f}"),
        ("baseline_loads_per_s", "{:,.0f}"),
        ("guest_load_ratio", "{:.3f}"),
        ("guest_loads_per_s", "{:,.0f}"),
        ("guest_alu_ratio", "{:.3f}"),
        ("guest_mem_ratio", "{:.3f}"),
        ("launch_ratio", "{:.3f}"),
        ("launch_gbps", "{:.2f} GB/s"),
        ("es_exit_ratio", "{:.2f}×"),
        ("sev_cpuid_us", "{:.0f} µs"),
        ("es_cpuid_us", "{:.0f} µs"),
        ("command_us", "{:.1f} µs"),
        ("send_page_us", "{:.1f} µs"),
        ("send_page_total_us", "{:.1f} µs"),
        ("receive_page_us", "{:.1f} µs"),
        ("page_crypto_us", "{:.1f} µs"),
        ("migrate_ratio", "{:.3f}"),
        ("migrate_mbps", "{:.1f} MB/s"),
        ("migrate_seconds", "{:.1f} s"),
        ("migrate_overlap", "{:.2f}"),
        ("migrate_rss_growth_ratio", "{:.2f}"),
        ("bounce_io_ratio", "{:.3f}"),
        ("bounce_io_mbps", "{:.1f} MB/s"),
        ("plain_write_mbps", "{:.1f} MB/s"),
        ("sparse_rss_mib", "{:.1f} MiB"),
        ("touched_mib", "{:.0f} MiB"),
        ("guest_boot_rss_mib", "{:.1f} MiB"),
        ("guest_boot_touched_mib", "{:.1f} MiB"),
        ("vm_start_ms", "{:.1f} ms"),
        ("service_rtt_ms", "{:.2f} ms"),
        ("service_rss_mib", "{:.1f} MiB"),
        ("service_touched_mib", "{:.1f} MiB"),
    ):
        target = result["targets"].get(key, "")
        if key in met:
            target += "  [green]met[/green]" if met[key] else "  [red]missed[/red]"
        table.add_row(key, fmt.format(result[key]), target)
    for name, mips in result["guest_mips"].items():
        table.add_row(f"guest_mips.{name}", f"{mips:,.0f}", "")
    Console().print(table)
    env = result["environment"]
    Console().print(
        f"[dim]{env['cpu']} ({', '.join(env['cpu_flags'])}), {env['cpus']} CPUs, "
        f"Python {env['python']}, numpy {env['numpy']}, "
        f"cryptography {env['cryptography']}[/dim]"
    )
    return 0
