"""Certificate chains: the file formats and the verification a guest owner performs.

Formats (sev-api.md §3.3; sevctl ``export``): PDH ‖ PEK ‖ OCA ‖ CEK, optionally followed by
ASK ‖ ARK (the "full" chain). PDH_CERT_EXPORT's chain buffer is PEK ‖ OCA ‖ CEK.

Verification follows the trust path ARK (self-signed) → ASK → CEK → PEK → PDH, plus the
owner's side OCA (self-signed) → PEK, and reports every link, so a failure says exactly
where the chain breaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

from sevsim.certs.amd import AmdCert
from sevsim.certs.sev import CERT_SIZE, CertError, SevCert, Usage, check_signed_by

GENERATIONS = ("naples", "rome", "milan", "genoa", "turin")


@dataclass
class CaRoot:
    """A trusted ARK and its ASK."""

    name: str
    ark: AmdCert
    ask: AmdCert


def builtin_root(generation: str) -> CaRoot:
    """AMD's real ARK and ASK of a generation, as published by AMD."""
    if generation not in GENERATIONS:
        raise ValueError(f"no AMD root for {generation!r}; known: {', '.join(GENERATIONS)}")
    base = resources.files("sevsim.certs") / "builtin" / generation
    ark = AmdCert.parse((base / "ark.cert").read_bytes())
    ask = AmdCert.parse((base / "ask.cert").read_bytes())
    return CaRoot(f"AMD {generation}", ark, ask)


@dataclass
class SevChain:
    pdh: SevCert
    pek: SevCert
    oca: SevCert
    cek: SevCert
    ask: AmdCert | None = None
    ark: AmdCert | None = None

    @property
    def full(self) -> bool:
        return self.ask is not None and self.ark is not None

    def encode(self, full: bool | None = None) -> bytes:
        out = self.pdh.raw + self.pek.raw + self.oca.raw + self.cek.raw
        if full if full is not None else self.full:
            if self.ask is None or self.ark is None:
                raise CertError("a full chain needs the ASK and the ARK")
            out += self.ask.raw + self.ark.raw
        return out


def _sev(data: bytes, index: int, what: str) -> SevCert:
    try:
        return SevCert.parse(data[index * CERT_SIZE : (index + 1) * CERT_SIZE])
    except CertError as exc:
        raise CertError(f"{what}: {exc}") from None


def decode_chain(data: bytes) -> SevChain:
    """PDH ‖ PEK ‖ OCA ‖ CEK [‖ ASK ‖ ARK]; raises CertError with a clear reason otherwise."""
    sev_len = 4 * CERT_SIZE
    if len(data) < sev_len:
        raise CertError(
            f"too short for a chain: PDH, PEK, OCA and CEK take {sev_len} bytes (optionally "
            f"followed by ASK and ARK); this file has {len(data)} bytes"
        )
    chain = SevChain(*(_sev(data, i, n) for i, n in enumerate(("PDH", "PEK", "OCA", "CEK"))))
    rest = data[sev_len:]
    if rest:
        try:
            ask_len = AmdCert.size_of(rest)
            chain.ask = AmdCert.parse(rest[:ask_len])
            chain.ark = AmdCert.parse(rest[ask_len:])
        except CertError as exc:
            check_shape(chain)  # garbage from the start: say so about its first certificate
            raise CertError(f"after the CEK: expected ASK and ARK: {exc}") from None
    return chain


PLACES = [
    ("first", "PDH", Usage.PDH),
    ("second", "PEK", Usage.PEK),
    ("third", "OCA", Usage.OCA),
    ("fourth", "CEK", Usage.CEK),
]


def check_shape(chain: SevChain) -> None:
    """Raise CertError, in words, if the chain's certificates are not SEV certificates in
    their places (version 1; PDH, PEK, OCA, CEK in that order): input that is not a chain
    at all, for which no root is worth choosing. A well-formed chain with a bad key or
    signature passes: ``verify_chain`` says which link fails."""
    for (place, name, usage), cert in zip(
        PLACES, (chain.pdh, chain.pek, chain.oca, chain.cek), strict=True
    ):
        if cert.version != 1:
            version = str(cert.version) if cert.version < 256 else f"{cert.version:#x}"
            raise CertError(
                f"the {place} certificate is not an SEV certificate (version {version}, not 1)"
            )
        if cert.usage != usage:
            found = cert.usage.name if cert.usage is not None else f"{cert.fields.pubkey_usage:#x}"
            raise CertError(f"the {place} certificate is not a {name} (its key usage is {found})")


def decode_pdh(data: bytes) -> SevCert:
    """A bare PDH, or the PDH at the start of a chain file."""
    if len(data) == CERT_SIZE:
        return SevCert.parse(data)
    return decode_chain(data).pdh


def decode_platform_certs(data: bytes) -> tuple[SevCert, SevCert, SevCert]:
    """PEK ‖ OCA ‖ CEK, as PDH_CERT_EXPORT writes its chain buffer."""
    if len(data) != 3 * CERT_SIZE:
        raise CertError(f"PEK, OCA and CEK take {3 * CERT_SIZE} bytes, not {len(data)}")
    return (_sev(data, 0, "PEK"), _sev(data, 1, "OCA"), _sev(data, 2, "CEK"))


@dataclass
class Link:
    subject: str  # the certificate checked
    check: str  # what was checked: "self-signed", "signed by the ASK", ...
    ok: bool
    reason: str = ""


@dataclass
class ChainReport:
    root: str
    links: list[Link] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(link.ok for link in self.links)

    def first_failure(self) -> Link | None:
        return next((link for link in self.links if not link.ok), None)


def _link(subject: str, check: str, reason: str | None) -> Link:
    return Link(subject, check, reason is None, reason or "")


def _sev_link(subject: str, cert: SevCert, signer_name: str, signer: SevCert | AmdCert) -> Link:
    check = "self-signed" if signer is cert else f"signed by the {signer_name}"
    try:
        key = signer.signing_key()
    except CertError as exc:
        return Link(subject, check, False, f"the {signer_name} key is unusable: {exc}")
    return _link(subject, check, check_signed_by(cert, key))


def verify_chain(chain: SevChain, root: CaRoot) -> ChainReport:
    """Every link of the chain against a trusted root. A chain that carries its own ASK and
    ARK must carry the trusted ones."""
    report = ChainReport(root.name)
    links = report.links
    if chain.ark is not None:
        same = chain.ark == root.ark
        links.append(Link("ARK", f"is the {root.name} ARK", same, "" if same else "another ARK"))
    if chain.ask is not None:
        same = chain.ask == root.ask
        links.append(Link("ASK", f"is the {root.name} ASK", same, "" if same else "another ASK"))
    links.append(_link("ARK", "self-signed", root.ark.check_signed_by(root.ark)))
    links.append(_link("ASK", "signed by the ARK", root.ask.check_signed_by(root.ark)))
    links.append(_sev_link("CEK", chain.cek, "ASK", root.ask))
    links.append(_sev_link("PEK", chain.pek, "CEK", chain.cek))
    links.append(_sev_link("OCA", chain.oca, "OCA", chain.oca))
    links.append(_sev_link("PEK", chain.pek, "OCA", chain.oca))
    links.append(_sev_link("PDH", chain.pdh, "PEK", chain.pek))
    if chain.pdh.usage != Usage.PDH:
        links.append(Link("PDH", "is a PDH", False, "the first certificate is not a PDH"))
    return report
