"""``sevsim info``: a profile, its CPUID and MSR values, decoded."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from sevsim.cli.options import build_profile, json_option, profile_option, seed_option
from sevsim.info import describe
from sevsim.profiles import PROFILES


@click.command()
@profile_option()
@click.option("--tsme", is_flag=True, help="Boot with the BIOS option Transparent SME.")
@click.option("--no-smee", is_flag=True, help="Boot with SMEE (SYSCFG[23]) off in the BIOS.")
@click.option("--all", "show_all", is_flag=True, help="Summarise every profile in one table.")
@seed_option
@json_option
def info(profile_name: str, tsme: bool, no_smee: bool, show_all: bool, seed, as_json: bool) -> int:
    """Show a machine profile and what its CPUID and MSRs report.

    Values are read with CPUID and RDMSR on core 0 of a freshly booted machine and decoded
    (C-bit position, address-space reduction, ASID ranges, SYSCFG bits). Values the AMD
    sources do not confirm are listed under "provenance".
    """
    if show_all:
        data = {name: describe(p.with_(seed=seed)) for name, p in PROFILES.items()}
        if as_json:
            click.echo(json.dumps(data, indent=2))
        else:
            _summary(data)
        return 0
    profile = build_profile(profile_name, seed, tsme=tsme, smee=not no_smee)
    data = describe(profile)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return 0
    console = Console()
    p, leaf, derived = data["profile"], data["cpuid"]["0x8000001f"], data["derived"]
    table = Table(title=f"{p['part']} ({p['generation']})", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    msrs, engine, cache = data["msr"], p["engine"], p["cache"]
    maxphy = data["cpuid"]["0x80000008"]["maxphyaddr"]
    reserved = derived["reserved_pte_address_bits"]
    smmlock = "set" if msrs["HWCR"]["smmlock"] else "clear"
    regs = "  ".join(f"{r.upper()} {leaf[r]}" for r in ("eax", "ebx", "ecx", "edx"))
    rows = [
        ("profile", p["name"]),
        ("CPUID 8000_001F", regs),
        ("features", ", ".join(leaf["features"])),
        ("C-bit", str(leaf["c_bit"])),
        ("address reduction", f"{leaf['phys_addr_reduction']} bits"),
        ("MAXPHYADDR", f"{maxphy} (effective {derived['effective_phys_bits']})"),
        (
            "reserved PTE bits",
            f"{reserved[0]}..{reserved[1]} (not the C-bit)" if reserved else "none",
        ),
        ("VMPLs", str(leaf["num_vmpl"])),
        ("cache coherent across domains", "yes" if leaf["hw_enforced_cache_coherency"] else "no"),
        ("ASIDs: SEV-ES/SNP", _range(derived["asid_ranges"]["sev_es_and_snp"])),
        ("ASIDs: SEV", _range(derived["asid_ranges"]["sev"])),
        ("ASIDs: unencrypted", _range(derived["asid_ranges"]["unencrypted_guests"])),
        ("SYSCFG", f"{msrs['SYSCFG']['value']} ({', '.join(msrs['SYSCFG']['bits'])})"),
        ("HWCR", f"{msrs['HWCR']['value']} (SMMLOCK {smmlock})"),
        ("SEV_STATUS", f"{msrs['SEV_STATUS']['value']} (a host is not an SEV guest)"),
        ("TSME", "on" if derived["tsme"] else "off"),
        ("SEV firmware", "API {api_major}.{api_minor}, build {build}".format(**p["firmware"])),
        (
            "AES engine",
            f"{engine['mode']}, AES-{engine['aes_key_bits']}, "
            f"host key slot {engine['host_key_slot']}",
        ),
        (
            "cache (model)",
            f"{cache['size_bytes'] >> 20} MiB, {cache['ways']}-way, "
            f"{cache['line_bytes']}-byte lines",
        ),
        ("DRAM (model)", f"{p['dram_bytes'] >> 30} GiB, {p['cores_simulated']} cores"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    prov = Table(title="provenance", show_header=False, title_justify="left")
    prov.add_column(style="bold")
    prov.add_column()
    for k, v in data["provenance"].items():
        prov.add_row(k, v)
    console.print(prov)
    return 0


def _range(r: list[int]) -> str:
    return f"{r[0]}..{r[1]}" if r else "none"


def _summary(data: dict) -> None:
    table = Table(title="machine profiles (sevsim info --profile NAME for details)")
    for col in ("profile", "gen.", "C-bit", "reduction", "ASIDs", "SEV from", "coherent", "engine"):
        table.add_column(col, no_wrap=True)
    for name, d in data.items():
        leaf = d["cpuid"]["0x8000001f"]
        table.add_row(
            name,
            d["profile"]["generation"],
            str(leaf["c_bit"]),
            str(leaf["phys_addr_reduction"]),
            str(leaf["max_encrypted_asid"]),
            str(leaf["min_sev_asid"]),
            "yes" if leaf["hw_enforced_cache_coherency"] else "no",
            d["profile"]["engine"]["mode"],
        )
    Console().print(table)
