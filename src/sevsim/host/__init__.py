"""Host software (untrusted in the SEV threat model): the host kernel and, later, the
hypervisor. It reaches the machine only through a core and the firmware's mailbox."""

from sevsim.host.kernel import HostKernel

__all__ = ["HostKernel"]
