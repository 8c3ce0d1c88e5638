"""Host software (untrusted in the SEV threat model): the host kernel, the /dev/sev driver
and the hypervisor. It reaches the machine only through its cores and the firmware's
mailbox."""

from sevsim.host.kernel import HostKernel

__all__ = ["HostKernel"]
