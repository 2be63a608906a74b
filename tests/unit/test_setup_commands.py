"""The README's two set-up commands work as written for root without sudo and for a user with
sudo: neither starts with sudo (a minimal container has none), and each script asks for it
only when it is not root."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def setup_commands() -> list[str]:
    section = README.split("## Set up on a fresh Debian machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", section, re.S)


def test_exactly_two_commands_without_sudo() -> None:
    commands = setup_commands()
    assert commands == ["scripts/run-local", "scripts/test"], commands


def test_ci_runs_the_readme_test_command() -> None:
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_root_without_sudo_needs_no_sudo(tmp_path: Path) -> None:
    """lib.sh, as root with no sudo on PATH, runs privileged commands directly."""
    if os.geteuid() != 0:
        return  # (the CI machines run as root; a developer's sudo is exercised by use)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "mktemp", "rm", "id", "python3", "env", "true"):
        found = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        if found:
            (bin_dir / tool).symlink_to(found)
    script = f". {ROOT}/scripts/lib.sh && as_root true && echo root-ok"
    result = subprocess.run(
        [str(bin_dir / "bash"), "-c", script],
        capture_output=True, text=True, env={"PATH": str(bin_dir)}, cwd=ROOT,
    )  # fmt: skip
    assert result.stdout.strip() == "root-ok", result.stderr


def test_scripts_are_executable() -> None:
    for name in ("run-local", "test"):
        assert os.access(ROOT / "scripts" / name, os.X_OK), name
