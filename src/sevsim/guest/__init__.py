"""Guest software (trusted in the SEV threat model): a small guest kernel that reaches the
machine only through its vCPU — guest virtual addresses, its own page tables and C-bits."""
