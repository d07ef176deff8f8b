"""The lab guest as a service (svmotion-guest.service on src): `python -m svlab.guest prepare|run`.

- `prepare --cache DIR`: build the guest's kernel and initrd (svlab/lab.py) unless cached; prints
  what it built and nothing when they were there already (provision.sh counts that as a change).
- `run --socket SOCK --export DISK --workdir DIR --cache DIR`: wait until the VM's NBD socket
  answers, boot the guest on that export with guest_job.sh (it writes files and verifies them,
  see there), and exit with the job's exit code when the guest powers off. The console goes to
  DIR/console.log (one line each, with seconds since boot). SIGTERM (systemctl stop, or the
  namespace lab's supervisor) sends the guest "stop": it checks every file once more, unmounts
  and powers off, and that job's exit code is this process's.
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from svlab import lab

JOB = Path(__file__).with_name("guest_job.sh")
SOCKET_PATIENCE_S = 120.0
STOP_PATIENCE_S = 90.0


def prepare(cache: Path) -> None:
    built_before = (cache / lab.lab_key() / "base.done").exists()
    images = lab.ensure_images(cache)
    if not built_before:
        print(f"guest images built in {images.root}")


def wait_for_socket(path: str, stop: threading.Event) -> bool:
    """True once a Unix socket accepts connections; False if told to stop first."""
    deadline = time.monotonic() + SOCKET_PATIENCE_S
    while not stop.is_set():
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return True
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise lab.LabError(f"the VM's NBD socket {path} does not answer; is the agent running?")
        stop.wait(0.5)
    return False


def run(sock: str, export: str, workdir: Path, cache: Path) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    images = lab.ensure_images(cache)
    workdir.mkdir(parents=True, exist_ok=True)
    if not wait_for_socket(sock, stop):
        return 0
    with lab.Guest(images, {"run.sh": JOB.read_text()}, workdir, disks=[lab.NbdDisk(sock, export)]) as guest:
        assert guest.proc is not None
        while not stop.is_set() and guest.proc.poll() is None:
            stop.wait(0.5)
        if stop.is_set() and guest.proc.poll() is None:
            guest.send("stop")
        return guest.wait_exit(timeout=STOP_PATIENCE_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svlab.guest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_prepare = sub.add_parser("prepare", help="build the guest's images unless cached")
    p_run = sub.add_parser("run", help="boot the guest on an svmotion export until SIGTERM")
    for p in (p_prepare, p_run):
        p.add_argument("--cache", type=Path, default=lab.default_cache_dir(), help="image cache directory")
    p_run.add_argument("--socket", required=True, help="the VM's NBD Unix socket")
    p_run.add_argument("--export", required=True, help="the disk's export name")
    p_run.add_argument("--workdir", type=Path, required=True, help="console.log and QEMU's files go here")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args.cache)
            return 0
        return run(args.socket, args.export, args.workdir, args.cache)
    except lab.LabError as err:
        print(f"svlab guest: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
