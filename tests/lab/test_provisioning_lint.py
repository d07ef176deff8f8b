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


def validate(where: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """`vagrant validate` in `where`, with a home of its own (not the user's ~/.vagrant.d)."""
    vagrant = need("vagrant", "vagrant")
    env = dict(os.environ, VAGRANT_HOME=str(home), VAGRANT_CHECKPOINT_DISABLE="1",
               VAGRANT_DOTFILE_PATH=str(home.parent / "dotfile"))       # not vagrant/.vagrant in the checkout
    return subprocess.run([vagrant, "validate"], cwd=where, env=env, capture_output=True, text=True, timeout=120)


def test_vagrantfile_validates(tmp_path: Path) -> None:
    done = validate(VAGRANT, tmp_path / "vagrant.d")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout


def test_validation_catches_a_bad_libvirt_setting(tmp_path: Path) -> None:
    """The check above has teeth: with vagrant-libvirt, a misspelt provider setting fails it."""
    plugins = subprocess.run([need("vagrant", "vagrant"), "plugin", "list"], capture_output=True, text=True,
                             env=dict(os.environ, VAGRANT_HOME=str(tmp_path / "vagrant.d")), timeout=120)
    if "vagrant-libvirt" not in plugins.stdout:
        pytest.skip("vagrant-libvirt is not installed: run `make setup` (Debian package vagrant-libvirt)")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("lab.env", "lab-pki.sh"):
        (broken / name).write_bytes((VAGRANT / name).read_bytes())
    text = (VAGRANT / "Vagrantfile").read_text()
    assert "lv.memory = spec[:memory]" in text
    (broken / "Vagrantfile").write_text(text.replace("lv.memory = spec[:memory]", "lv.memmory = spec[:memory]"))
    done = validate(broken, tmp_path / "vagrant.d")
    assert done.returncode != 0 and "memmory" in done.stdout + done.stderr, done.stdout + done.stderr


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
