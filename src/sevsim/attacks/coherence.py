"""A host kernel that changes a page's C-bit without flushing its cache lines first."""

from __future__ import annotations

from sevsim.attacks.lab import AttackResult, attack
from sevsim.profiles import MachineProfile
from sevsim.system import HostSystem

OLD = b"old data, written through the C=1 mapping ".ljust(4096, b".")
NEW = b"new data, written through the C=0 mapping ".ljust(4096, b"!")


@attack(
    "cache-alias",
    "Changing the C-bit without a flush corrupts data",
    """The cache tags lines with their encryption domain: the same physical line read with
    C=1 and with C=0 are two different cache lines. A kernel writes a page through an
    encrypted mapping — the lines sit dirty in the cache — then makes the page decrypted
    without first flushing them (the step Linux's set_memory_decrypted does first), and
    writes new data in plaintext, flushed to DRAM for a device. When the caches are later
    written back, the stale encrypted lines land on top: the page now holds ciphertext of
    the old data. Parts with HwEnforcedCacheCoh (Zen 3 and later) drop the other domain's
    lines on a write and are immune.""",
    "flush before changing the C-bit (clflush_cache_range in set_memory_decrypted), or "
    "HwEnforcedCacheCoh (CPUID 0x8000001F EAX[10])",
)
def cache_alias(profile: MachineProfile, r: AttackResult) -> None:
    coherent = profile.sme_coherent
    outcome = {}
    for skip in (True, False):
        with HostSystem.start(profile.with_(tsme=False)) as system:
            kernel, core = system.kernel, system.machine.cores[0]
            va = kernel.alloc_pages(1)
            kernel.write(va, OLD)
            kernel.set_memory_decrypted(va, 1, skip_cache_flush=skip)
            kernel.write(va, NEW)
            for line in range(va, va + 4096, 64):  # the new data goes to DRAM for a device
                core.clflush(line)
            core.wbinvd()  # later: the caches are written back
            got = kernel.read(va, 4096)
            bad = sum(got[i : i + 64] != NEW[i : i + 64] for i in range(0, 4096, 64))
            outcome["without flush" if skip else "with flush"] = bad
            r.step(
                f"{'skipping' if skip else 'doing'} the flush: {bad} of 64 lines "
                f"no longer hold the new data"
            )
    r.figures = {
        "hw_enforced_cache_coherency": coherent,
        "corrupted_lines": outcome,
    }
    r.succeeded = outcome["without flush"] > 0
