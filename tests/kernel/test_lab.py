"""The VM lab itself: console control, job exit codes, clean stops, and a cache with only images.

Issue 5, item 4: the lab leaves no process and no temporary file behind; its cache holds the
built images and nothing else (the .debs and the unpacked kernel are removed after a build).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from agent import attach as attach_mod
from svlab import lab

pytestmark = pytest.mark.kernel


def test_cache_holds_only_the_images(lab_images_python: lab.LabImages) -> None:
    root = lab_images_python.root
    assert sorted(p.name for p in root.iterdir()) == [
        "base.done", "initrd.gz", "pyroot.done", "pyroot.img", "vmlinuz"]
    assert sorted(p.name for p in root.parent.iterdir()) == sorted([root.name, ".lock"])
    assert lab_images_python.kernel_release.endswith("-amd64")


def test_console_lines_reach_the_guest_and_its_exit_code_the_host(lab_images: lab.LabImages, guests) -> None:
    job = {"run.sh": 'echo "READY $(uname -r)"\nread -r code\necho "GOT $code"\nexit "$code"\n'}
    guest = guests(lab_images, job)
    ready = guest.wait_for(r"^READY (\S+)$", timeout=90)
    assert ready.group(1) == lab_images.kernel_release
    guest.send("7")
    assert guest.wait_exit(timeout=60) == 7
    assert "GOT 7" in guest.lines
    assert guest.proc.poll() is not None


def test_a_stopped_guest_leaves_nothing(lab_images: lab.LabImages, tmp_path: Path) -> None:
    workdir = tmp_path / "g"
    workdir.mkdir()
    guest = lab.Guest(lab_images, {"run.sh": "echo SLEEPING\nsleep 600\n"}, workdir)
    with guest:
        guest.wait_for("^SLEEPING$", timeout=90)
        pid = guest.proc.pid
        assert attach_mod.pid_alive(pid)
    assert not attach_mod.pid_alive(pid)
    assert sorted(p.name for p in workdir.iterdir()) == ["console.log", "qemu.log"]
