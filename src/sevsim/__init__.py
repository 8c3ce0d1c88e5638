"""sevsim: a software AMD EPYC machine with memory encryption (SME, TSME, SEV)."""

__version__ = "0.1.0"
