"""Pictures of memory: one pixel per byte (or per page for key domains).

* ``padlock``: the bitmap a guest keeps in its private memory for the classic picture —
  large flat areas, so that any structure the encryption lets through shows.
* ``classic``: the same guest picture in DRAM under no encryption, the xe engine (Zen 1's
  fixed tweak), xe with two tweak constants zero (a weak tweak, as SEVurity saw on early
  Ryzen firmware) and xex (per-boot random tweaks), next to what the guest reads.
* ``memory_image`` and ``key_map``: a physical range as the DRAM holds it or as the host
  CPU reads it, and which encryption domain each 4 KiB page belongs to.

The machine state comes from staging a scenario on fresh machines, with the same means the
demo uses. The guests run the real-code image (``sevsim.guest.x86``): its ``picture``
workload draws the padlock at ``PICTURE_GPA``; what the guest reads there comes out the way
a debugger reads it (KVM_SEV_DBG_DECRYPT: the guests' policy allows debugging), checked
against the SHA-256 the guest prints.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from sevsim.guest import x86 as x86_guest
from sevsim.guest.picture import SIZE, padlock  # noqa: F401 - part of this module's API
from sevsim.host.kvm import Vm
from sevsim.profiles import MachineProfile
from sevsim.system import HostSystem

PICTURE_BYTES = SIZE * SIZE
PICTURE_GPA = x86_guest.symbols()["PICTURE_GPA"]  # where the `picture` workload draws
GUEST_MEMORY = x86_guest.MIN_MEMORY
CAPTION = 18  # pixels above each panel for its label
GAP = 8


def _bytes_image(data: bytes, width: int) -> Image.Image:
    rows = len(data) // width
    return Image.frombytes("L", (width, rows), bytes(data[: rows * width]))


def guest_reads(vm: Vm, gpa: int, n: int) -> bytes:
    """What the guest reads at ``gpa``, as a debugger gets it: DBG_DECRYPT for an SEV
    guest, the host's mapping for another."""
    return vm.sev_dbg_decrypt(gpa, n) if vm.sev else vm.read(gpa, n)


def _guest_picture(profile: MachineProfile, sev: bool, cmdline: str) -> tuple[bytes, bytes]:
    """(what the guest reads, what DRAM holds) of the padlock a guest keeps privately."""
    with HostSystem.start(profile, cmdline=cmdline) as system:
        vm = system.start_x86_guest("picture", "picture", memory=GUEST_MEMORY, sev=sev)
        vm.run()
        seen = guest_reads(vm, PICTURE_GPA, PICTURE_BYTES)
        if f"sha256 {hashlib.sha256(seen).hexdigest()}" not in vm.console_text():
            raise RuntimeError("the picture read back is not the one the guest drew")
        system.kernel.wbinvd_on_all_cpus()
        dram = system.machine.dram.read(vm.spa(PICTURE_GPA), PICTURE_BYTES)
        return seen, dram


@dataclass
class Panel:
    label: str
    data: bytes


def classic_panels(profile: MachineProfile) -> list[Panel]:
    """The guest's view, then DRAM under none, xe, weak xe and xex."""
    xex = profile.with_(engine_mode="xex", xe_zero_tweak_bits=())
    seen, dram_xex = _guest_picture(xex, True, "mem_encrypt=on")
    _, plain = _guest_picture(xex.with_(tsme=False), False, "mem_encrypt=off")
    xe = profile.with_(engine_mode="xe", xe_zero_tweak_bits=())
    _, dram_xe = _guest_picture(xe, True, "mem_encrypt=on")
    weak = xe.with_(xe_zero_tweak_bits=(8, 9))
    _, dram_weak = _guest_picture(weak, True, "mem_encrypt=on")
    return [
        Panel("what the guest reads", seen),
        Panel("DRAM, no encryption", plain),
        Panel("DRAM, xe (Zen 1)", dram_xe),
        Panel("DRAM, xe, t8=t9=0", dram_weak),
        Panel("DRAM, xex (Zen 2+)", dram_xex),
    ]


def side_by_side(panels: list[Panel], width: int = SIZE) -> Image.Image:
    images = [_bytes_image(p.data, width) for p in panels]
    height = max(i.height for i in images) + CAPTION
    out = Image.new("L", (sum(i.width for i in images) + GAP * (len(images) - 1), height), 255)
    draw = ImageDraw.Draw(out)
    x = 0
    for panel, img in zip(panels, images, strict=True):
        draw.text((x + 2, 3), panel.label, fill=0)
        out.paste(img, (x, CAPTION))
        x += img.width + GAP
    return out


# ---- statistics the tests and the report use --------------------------------------------
def chi_square(data: bytes) -> float:
    """Pearson's chi-square of the byte histogram against uniform (255 degrees of freedom:
    mean 255, standard deviation about 22.6 for random bytes)."""
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    expected = len(data) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def repeated_blocks(data: bytes, distance: int = SIZE) -> float:
    """The share of 16-byte blocks equal to the block ``distance`` bytes earlier (one row
    up): structure an ECB-like mode lets through."""
    blocks = np.frombuffer(data, dtype=np.uint8).reshape(-1, 16)
    step = distance // 16
    same = np.all(blocks[step:] == blocks[:-step], axis=1)
    return float(same.mean())


# ---- a physical range: DRAM, the host's view, key domains -------------------------------
KEY_COLOURS = {
    "unused": (0, 0, 0),
    "host (SME key)": (60, 110, 220),
    "guest shared (C=0)": (240, 200, 40),
    "plain VM (host key)": (150, 150, 150),
}
GUEST_COLOURS = [(200, 50, 50), (50, 170, 80), (170, 60, 190), (230, 120, 40)]


def scenario(profile: MachineProfile) -> tuple[HostSystem, list[Vm]]:
    """An SME host with two SEV guests (one holding the padlock) and an ordinary VM; the
    caller closes the system."""
    system = HostSystem.start(profile)
    vms = []
    guests = (
        ("alpha", True, "picture"),
        ("beta", True, "secret:beta"),
        ("plain", False, "secret:plain"),
    )
    for name, sev, workload in guests:
        vm = system.start_x86_guest(name, workload, memory=GUEST_MEMORY, sev=sev)
        vm.run()
        vms.append(vm)
    system.kernel.wbinvd_on_all_cpus()
    return system, vms


def page_domains(system: HostSystem, vms: list[Vm], start: int, npages: int) -> list[str]:
    """The encryption domain of each 4 KiB page of [start, start + npages pages), from the
    hypervisor's bookkeeping (which pages back which guest, which the guest shared)."""
    owner: dict[int, str] = {}
    for vm in vms:
        shared = {gpa + i * 4096 for gpa, n in vm.shared_ranges for i in range(n)}
        for slot in vm.slots:  # its RAM and its flash (not through the isa-bios alias)
            base = vm.kernel.pa(slot.hva)
            for offset in range(0, slot.size, 4096):
                if vm.sev and slot.gpa + offset in shared:
                    label = "guest shared (C=0)"
                elif vm.sev:
                    label = f"{vm.name} (ASID {vm.asid})"
                else:
                    label = "plain VM (host key)"
                owner[(base + offset) >> 12] = label
    written = set(system.machine.dram.written_pages())
    out = []
    for page in range(start >> 12, (start >> 12) + npages):
        if page in owner:
            out.append(owner[page])
        elif page << 12 in written:
            out.append("host (SME key)")
        else:
            out.append("unused")
    return out


def key_map(domains: list[str], width: int = 64, scale: int = 4) -> Image.Image:
    """One square of ``scale`` pixels per page, ``width`` pages per row, with a legend."""
    colours = dict(KEY_COLOURS)
    for label in dict.fromkeys(domains):
        if label not in colours:
            colours[label] = GUEST_COLOURS[(len(colours) - len(KEY_COLOURS)) % len(GUEST_COLOURS)]
    rows = -(-len(domains) // width)
    legend = 14 * len(colours) + 6
    img = Image.new("RGB", (max(width * scale, 260), rows * scale + legend), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, label in enumerate(domains):
        x, y = (i % width) * scale, (i // width) * scale
        draw.rectangle([x, y, x + scale - 1, y + scale - 1], fill=colours[label])
    y = rows * scale + 4
    for label, colour in colours.items():
        draw.rectangle([2, y + 2, 12, y + 11], fill=colour, outline=(0, 0, 0))
        draw.text((18, y), label, fill=(0, 0, 0))
        y += 14
    return img
