"""Which root a guest owner trusts, and checking a platform's chain against it."""

from __future__ import annotations

from pathlib import Path

from sevsim.amd.root import published_root
from sevsim.certs.chain import (
    GENERATIONS,
    CaRoot,
    ChainReport,
    SevChain,
    builtin_root,
    check_shape,
    verify_chain,
)
from sevsim.certs.sev import check_signed_by

ROOT_CHOICES = ("sim", *GENERATIONS, *(f"sim:{g}" for g in GENERATIONS))


class TrustError(ValueError):
    """The requested root is not available."""


def choose_root(chain: SevChain, root: str, data_dir: Path) -> CaRoot:
    """``naples``…``turin``: AMD's real root of that generation. ``sim`` (or ``sim:<gen>``):
    the simulator's root; with ``sim`` the generation is the one whose ASK signed the CEK,
    or whose ARK the chain carries."""
    if root in GENERATIONS:
        return builtin_root(root)
    if root == "sim" or root.startswith("sim:"):
        gens = [root[4:]] if root.startswith("sim:") else list(GENERATIONS)
        if any(g not in GENERATIONS for g in gens):
            raise TrustError(f"unknown generation in {root!r}")
        candidates = [r for r in (published_root(g, data_dir) for g in gens) if r is not None]
        if not candidates:
            raise TrustError(
                f"no simulated AMD root in {data_dir}/amd-sim-root: it is created when a "
                "simulated platform's CEK is first signed (e.g. by 'sevsim platform export')"
            )
        for candidate in candidates:
            if chain.ark is not None and chain.ark == candidate.ark:
                return candidate
            if (
                chain.ark is None
                and check_signed_by(chain.cek, candidate.ask.signing_key()) is None
            ):
                return candidate
        return candidates[0]
    raise TrustError(f"unknown root {root!r}; choose one of: {', '.join(ROOT_CHOICES)}")


def verify(chain: SevChain, root: str, data_dir: Path) -> ChainReport:
    """Every link against the chosen root. Raises CertError first, without choosing a root,
    if the input is no chain at all (``check_shape``)."""
    check_shape(chain)
    return verify_chain(chain, choose_root(chain, root, data_dir))
