"""The AMD Secure Processor and its SEV firmware.

Host software reaches it only through ``sevsim.psp.mailbox.Mailbox`` (``machine.mailbox``);
everything else in this package is the inside of the chip.
"""
