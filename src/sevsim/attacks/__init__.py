"""What a malicious host or a physical attacker can do, using only what they really have."""
