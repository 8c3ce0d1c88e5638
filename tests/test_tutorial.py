"""docs/tutorial.md, chapter 10 ("Write and run your own guest"), run as written: every
command of its shell blocks, in order, in a scratch directory with a scratch HOME, through
`sh` and a `sevsim` on PATH; then the outputs the chapter shows or states are checked
against the guest's source (its message, its code) and against what the commands print."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"
MESSAGE = b"hello from a private page\n"
TOOLS = ("sh", "as", "ld", "objcopy", "wc", "od", "head")

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in TOOLS),
    reason="the chapter needs GNU binutils (as, ld, objcopy) and a POSIX shell",
)


def chapter() -> str:
    doc = DOC.read_text()
    return re.search(r"^## 10\. Write and run your own guest\n(.*?)^## ", doc, re.S | re.M)[1]


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M)]


def shell_commands(block: str) -> list[str]:
    """One entry per command: continuation lines joined, a here-document kept whole."""
    lines = block.splitlines()
    commands, i = [], 0
    while i < len(lines):
        first = i
        while lines[i].endswith("\\"):
            i += 1
        here = re.search(r"<<'(\w+)'", lines[i])
        if here:
            i = lines.index(here[1], i + 1)
        command = "\n".join(lines[first : i + 1])
        if command.strip():
            commands.append(command)
        i += 1
    return commands


def hexdump(address: int, data: bytes) -> str:
    """What HMP's `xp /Nxb` prints: eight bytes a line."""
    return "".join(
        f"{address + i:016x}:" + "".join(f" 0x{b:02x}" for b in data[i : i + 8]) + "\n"
        for i in range(0, len(data), 8)
    )


def dumped_bytes(dump: str) -> bytes:
    return bytes(int(word, 16) for line in dump.splitlines() for word in line.split()[1:])


def registers(dump: str) -> dict[str, int]:
    return {
        name.strip(): int(value, 16) for name, value in re.findall(r"(\w+ ?)=([0-9a-f]+)", dump)
    }


def wait_for(path: Path, content: bytes, timeout: float = 60) -> None:
    """The guest runs once 'cont' has returned: wait until its console says it is done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes() == content:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path.name}: {path.read_bytes() if path.exists() else 'missing'!r}")


def test_the_write_your_own_guest_chapter_runs_as_written(tmp_path):
    blocks = fenced_blocks(chapter())
    layout = "sh sh sh sh text sh text sh sh text sh text sh"  # the steps the test follows
    assert [lang for lang, _ in blocks] == layout.split()
    source = blocks[0][1]
    assert '.ascii\t"hello from a private page\\n"' in source  # the message this test expects

    bin_dir, home, work = tmp_path / "bin", tmp_path / "home", tmp_path / "work"
    for d in (bin_dir, home, work):
        d.mkdir()
    wrapper = bin_dir / "sevsim"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m sevsim "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEVSIM_")}
    env |= {"HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    env["SEVSIM_DATA"] = os.environ["SEVSIM_DATA"]  # the test run's simulated AMD roots

    ran: list[tuple[str, str, str]] = []  # (command, stdout, stderr), in order
    # The text block after a shell block shows its last command's output: (command, text).
    shown: list[tuple[str, str]] = []
    console = None
    try:
        for (lang, body), after in zip(blocks, [*blocks[1:], ("", "")], strict=True):
            if lang != "sh":
                continue
            for command in shell_commands(body):
                proc = subprocess.run(
                    ["sh", "-c", command],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=180,
                    check=False,
                )
                assert proc.returncode == 0, f"{command}\n{proc.stderr}"
                ran.append((command, proc.stdout, proc.stderr))
                if m := re.search(r"--console (\S+)", command):
                    console = work / m[1]
                if command.endswith(" cont"):
                    wait_for(console, MESSAGE)
            if after[0] == "text":
                shown.append((ran[-1][0], after[1]))
    finally:
        subprocess.run(
            ["sh", "-c", "sevsim vm qmp qmp.sock quit; sevsim platform stop --state plat"],
            cwd=work,
            env=env,
            capture_output=True,
            timeout=180,
            check=False,
        )

    def outputs(fragment: str) -> list[str]:
        return [out for command, out, _ in ran if fragment in command]

    # The image: 64 KiB, the message in it, a near jump at the reset vector.
    image = (work / "hello.fd").read_bytes()
    assert len(image) == 65536 and outputs("wc -c")[0].strip() == "65536"
    assert image[0xFFF0:0xFFF3] == bytes.fromhex("e90d00")
    assert outputs("od -An")[0].split() == ["e9", "0d", "00"]
    assert (0xFFF3 + 0x000D) & 0xFFFF == image.index(b"\xfa\xfc")  # to cli; cld at start

    # Run to completion: the line, after the launch measurement under SEV.
    plain_run, sev_run = [out for c, out, _ in ran if "vm run" in c and "--qmp" not in c]
    assert plain_run == MESSAGE.decode()
    first, rest = sev_run.split("\n", 1)
    assert first.startswith("launch measurement: ") and rest == MESSAGE.decode()
    assert [err for c, _, err in ran if "--daemonize" in c] == [
        "VM paused; QMP on unix:qmp.sock\n",
        "SEV guest paused after LAUNCH_MEASURE; QMP on unix:qmp.sock\n",
        "SEV guest paused after LAUNCH_MEASURE; QMP on unix:qmp.sock\n",
    ]
    assert set(outputs(" cont")) == set(outputs(" quit")) == {"{}\n"}
    for log in ("plain.log", "sev.log", "debug.log"):
        assert outputs(f"cat {log}") == [MESSAGE.decode()]

    # The hypervisor's reads of the page at 0x10000: plain VM, SEV guest, debug policy.
    plaintext = hexdump(0x10000, MESSAGE[:16])
    plain_xp, sev_xp, debug_xp = outputs("xp /16xb 0x10000")
    assert plain_xp == plaintext and debug_xp == plaintext
    assert [line.split(":")[0] for line in sev_xp.splitlines()] == [
        line.split(":")[0] for line in plaintext.splitlines()
    ]
    assert dumped_bytes(sev_xp) != MESSAGE[:16]
    (reset_xp,) = outputs("xp /3xb 0xfffffff0")
    assert dumped_bytes(reset_xp) != bytes.fromhex("e90d00")

    # What the chapter shows: the same bytes, but for the ciphertext, which a new VEK changes.
    (cmd1, plain_shown), (cmd2, sev_shown), (cmd3, regs_shown), (cmd4, debug_shown) = shown
    assert "xp /16xb" in cmd1 and plain_shown == plain_xp
    assert "xp /16xb" in cmd2
    assert dumped_bytes(sev_shown) not in (MESSAGE[:16], dumped_bytes(sev_xp))
    assert "info registers" in cmd3 and regs_shown == outputs("info registers")[0]
    assert "xp /16xb" in cmd4 and debug_shown == debug_xp

    # The registers, as the text explains them.
    regs = registers(regs_shown)
    assert regs["RAX"] == 0x1000 | MESSAGE[-1]  # AH from 'mov $0x1000, %ax', AL the '\n'
    assert regs["RDI"] == len(MESSAGE)
    assert regs["RSI"] == image.index(MESSAGE) + len(MESSAGE)  # msg_end
    assert regs["RDX"] == 0x00A0_0000 | 0x3F8  # Milan's signature 0x00A00F11 above DX
