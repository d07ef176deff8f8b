"""`svmotion demo`, the README's first command (`make demo`), run as a user runs it.

Two migrations of a two-disk VM under a verifying writer, with both stun strategies: the demo
passes only when the destination equals the writer's model, the first source was not written
after its switchover and the writer saw no error. Its temporary directory and its processes
are gone after it.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from agentproc import PYTHON, ROOT


def test_the_demo_migrates_twice_and_checks_everything_then_leaves_nothing() -> None:
    done = subprocess.run([PYTHON, "-m", "agent.cli", "demo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for check in ("destination equals the writer's model byte for byte", "the first source was not written after "
                  "its switchover", "the writer saw no error"):
        assert f"check: {check}: yes" in out, out
    assert done.stdout.rstrip().endswith("demo passed"), out
    rows = re.findall(r"^(optimized|legacy)\s+(mirror_install|switchover)\s+[\d.]+ ms", out, re.M)
    assert rows == [("optimized", "mirror_install"), ("optimized", "switchover"), ("legacy", "mirror_install"),
                    ("legacy", "switchover")], out
    root = Path(re.search(r"^svmotion demo in (\S+)$", out, re.M).group(1))
    assert not root.exists(), f"{root} left behind"
    # Its agent and nbdkit ran with the directory on their command lines: none may be left.
    left = subprocess.run(["pgrep", "-af", str(root)], capture_output=True, text=True).stdout
    assert not left.strip(), left
