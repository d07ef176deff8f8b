"""The Vagrant lab's files, checked without machines: `vagrant validate` and shellcheck.

The Vagrant lab cannot boot here (no nested virtualisation to speak of, no boxes); what CI
proves about its provisioning it proves by running the very scripts in the namespace lab
(test_nslab.py). These checks catch the rest: a Vagrantfile Vagrant cannot load, and any shell
script (provisioning, migration, the guest's job) that shellcheck finds fault with.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VAGRANT = ROOT / "vagrant"
SCRIPTS = sorted([*VAGRANT.glob("*.sh"), VAGRANT / "lab.env", ROOT / "svlab" / "guest_job.sh"])


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.skip(f"{tool} is not installed: run `make setup` (Debian package {package})")
    return path


def test_vagrantfile_validates(tmp_path: Path) -> None:
    vagrant = need("vagrant", "vagrant")
    # A home of its own: validate must not depend on (or write to) the user's ~/.vagrant.d.
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "vagrant.d"), VAGRANT_CHECKPOINT_DISABLE="1")
    done = subprocess.run([vagrant, "validate"], cwd=VAGRANT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout


def test_vagrantfile_takes_its_addresses_from_lab_env() -> None:
    """One source for the addresses: the Vagrantfile reads lab.env, which the scripts source."""
    text = (VAGRANT / "Vagrantfile").read_text()
    assert 'File.read(File.join(__dir__, "lab.env"))' in text
    for name in ("SRC_ADDR", "DST_ADDR", "MON_ADDR"):
        assert f'LAB.fetch("{name}")' in text
        assert f': "${{{name}:=' in (VAGRANT / "lab.env").read_text()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_passes_shellcheck(script: Path) -> None:
    shellcheck = need("shellcheck", "shellcheck")
    done = subprocess.run([shellcheck, "-x", "--shell=sh", str(script)], cwd=script.parent, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
