"""Helpers of the lab tests: the lab CLI and the guest's console (a plain module: tests import it)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from agentproc import PYTHON, ROOT

from svlab import nslab as nslab_mod


def lab_cli(labdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`svmotion lab --dir LABDIR ARGS...`, the real CLI from this worktree."""
    return subprocess.run([PYTHON, "-m", "agent.cli", "lab", "--dir", str(labdir), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def console_lines(ns: nslab_mod.NsLab) -> list[str]:
    """The guest's console so far, without svlab/lab.py's time stamps."""
    text = ns.console.read_text(errors="replace") if ns.console.exists() else ""
    return [re.sub(r"^\s*[\d.]+ ", "", line) for line in text.splitlines()]
