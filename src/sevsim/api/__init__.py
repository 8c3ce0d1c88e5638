"""The SEV firmware API as the spec defines it: command ids, status codes, and the byte
layouts of command buffers and the structures they point to. Shared by the firmware
(which parses them), host drivers (which build them) and guest-owner tools; holds no
secrets and no behaviour."""
