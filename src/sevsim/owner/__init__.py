"""The guest owner's tools. The owner never touches the machine: it reads and writes files
and bytes (certificate chains, sessions, measurements, secrets), as a remote owner does."""
