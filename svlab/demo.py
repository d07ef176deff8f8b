"""`svmotion demo` (what `make demo` runs): one VM, two disks, migrated twice under a verifying writer.

Design notes
- Everything real, nothing installed: a temporary directory holds the disks, the agent's config
  and state; the agent runs as a subprocess (`svmotion agent`), it starts nbdkit with the mirror
  node, and a `VerifyingWriter` writes through libnbd during both migrations.
- Two migrations, so the seed's point is visible in one run: first with the optimized stun
  strategy (disks stay open), then with the legacy one (disks closed and reopened under the
  stun). The stun table compares what the guest felt (longest wait of a held request).
- The end check is byte for byte: the final destination against the writer's model, and the
  first source unchanged since its switchover (no write went back to it).
- Cleanup runs on every path: writer stopped, agent shut down with its nbdkit, the nbdkit stopped
  by pid (start time checked) if it is still there, the directory removed (unless --keep).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.jsonlines import JsonLinesClient, RemoteError
from agent.plan import human_bytes
from agent.progress import Progress, phase_table
from agent.supervisor import process_start_time
from svlab.writer import VerifyingWriter, fill_pattern_image

MiB = 1 << 20
DISK_SIZE = 64 * MiB
DISKS = ("disk0", "disk1")
WRITER_RATE = 12 * MiB
COPY_RATE = 64 * MiB


def say(text: str) -> None:
    print(text, flush=True)


def build_vm(root: Path) -> tuple[Path, dict[str, Path]]:
    """Two sparse disks with pattern data, an nvram file, a sidecar per disk, and the agent's config."""
    src, state = root / "src", root / "state"
    src.mkdir()
    state.mkdir()
    pristine = {}
    for name in DISKS:
        disk = src / f"{name}.raw"
        fill_pattern_image(disk, name, DISK_SIZE, [(0, 16 * MiB), (40 * MiB, 8 * MiB)])
        (src / f"{name}.ctk").write_bytes(os.urandom(16384))
        pristine[name] = root / f"{name}.initial"
        subprocess.run(["cp", "--sparse=always", str(disk), str(pristine[name])], check=True)
    (src / "demo.nvram").write_bytes(os.urandom(8192))
    disks = "\n".join(f'  [[vm.disk]]\n  name = "{n}"\n  path = "src/{n}.raw"\n  sidecars = ["src/{n}.ctk"]\n'
                      for n in DISKS)
    config = root / "agent.toml"
    config.write_text(f'[agent]\nsocket = "state/agent.sock"\nstate_dir = "state"\nmetrics = ""\n\n'
                      f'[[vm]]\nname = "demo"\nsocket = "state/demo.nbd"\nfiles = ["src/demo.nvram"]\n\n{disks}')
    return config, pristine


def start_agent(root: Path, config: Path) -> subprocess.Popen[bytes]:
    log = open(root / "agent.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "SVMOTION_INJECT": ""})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited: {(root / 'agent.log').read_text()[-2000:]}")
        try:
            agent_call(root, "status")
            return proc
        except (OSError, ValueError, RemoteError):
            time.sleep(0.05)
    raise RuntimeError(f"the agent did not answer within 20 s; see {root / 'agent.log'}")


def agent_call(root: Path, op: str, **args: Any) -> dict[str, Any]:
    with JsonLinesClient(str(root / "state" / "agent.sock"), timeout=60) as client:
        return client.call(op, **args)


def migrate(root: Path, dest: Path, strategy: str) -> dict[str, Any]:
    """One migration through the agent's API, with a progress line, until it ends."""
    dest.mkdir()
    reply = agent_call(root, "migrate", vm="demo", dest=str(dest), strategy=strategy, rate=COPY_RATE,
                       mirror="sync", stun_budget=0.05)
    mid = reply["migration"]["id"]
    progress = Progress(sys.stdout)
    while True:
        vm = agent_call(root, "status", vm="demo")["vms"][0]
        if vm["migration"]:
            progress.update(vm["migration"])
        elif vm["last"] and vm["last"]["id"] == mid:
            progress.close()
            return vm["last"]
        time.sleep(0.2)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(MiB):
            h.update(piece)
    return h.hexdigest()


def stun_rows(records: list[dict[str, Any]]) -> list[str]:
    rows = [f"{'strategy':<10} {'stun':<15} {'duration':>10} {'guest wait':>11} {'held':>5}"]
    for rec in records:
        for stun in rec["stuns"]:
            rows.append(f"{rec['options']['strategy']:<10} {stun['kind']:<15} "
                        f"{stun['duration_seconds'] * 1000:8.2f} ms {stun['max_wait_seconds'] * 1000:8.2f} ms "
                        f"{stun['held_requests']:>5}")
    return rows


def stop_everything(root: Path, agent: subprocess.Popen[bytes] | None) -> None:
    if agent is not None and agent.poll() is None:
        try:
            agent_call(root, "shutdown", stop_vms=True)
            agent.wait(timeout=20)
        except (OSError, ValueError, RemoteError, subprocess.TimeoutExpired):
            agent.kill()
            agent.wait()
    try:
        rec = json.loads((root / "state" / "demo.pid").read_text())
        if process_start_time(int(rec["pid"])) == int(rec["start_time"]):
            os.kill(int(rec["pid"]), signal.SIGTERM)
    except (OSError, ValueError, KeyError):
        pass


def run_demo(keep: bool = False) -> int:
    """Build, migrate twice under load, check, clean up; 0 when every check passed."""
    root = Path(tempfile.mkdtemp(prefix="svmotion-demo-", dir="/tmp"))
    agent: subprocess.Popen[bytes] | None = None
    writer: VerifyingWriter | None = None
    ok = False
    try:
        say(f"svmotion demo in {root}")
        config, pristine = build_vm(root)
        say(f"VM 'demo': {len(DISKS)} disks of {human_bytes(DISK_SIZE)} (sparse, "
            f"{human_bytes(24 * MiB)} of data each), an nvram file, a change-tracking sidecar per disk")
        agent = start_agent(root, config)
        nbd = root / "state" / "demo.nbd"
        writer = VerifyingWriter({n: f"nbd+unix:///{n}?socket={nbd}" for n in DISKS},
                                 initial={n: str(p) for n, p in pristine.items()},
                                 connections=2, queue_depth=8, rate=WRITER_RATE)
        writer.start()
        say(f"agent up, nbdkit serving {nbd}; verifying writer running "
            f"({writer.connections} connections per disk, queue depth {writer.queue_depth}, "
            f"{human_bytes(WRITER_RATE)}/s)")
        time.sleep(0.5)
        records = []
        for step, (strategy, dest) in enumerate((("optimized", root / "dest-a"), ("legacy", root / "dest-b"))):
            say(f"\n== migration {step + 1}: {strategy} stun strategy -> {dest}")
            record = migrate(root, dest, strategy)
            say(phase_table(record))
            if record["state"] != "success":
                say(f"migration {record['state']}: {record['error']}")
                return 1
            records.append(record)
            if step == 0:        # the source as the first switchover left it: nothing may touch it after
                first_source = {n: digest(root / "src" / f"{n}.raw") for n in DISKS}
            time.sleep(1.0)      # the writer goes on, now on the destination
        report = writer.stop()
        say("\n== stun times (what the guest felt is the guest wait: the longest held request)")
        say("\n".join(stun_rows(records)))
        say(f"\nwriter: {report.summary()}")
        bad = {n: writer.verify_image(n, root / "dest-b" / f"{n}.raw") for n in DISKS}
        untouched = all(digest(root / "src" / f"{n}.raw") == first_source[n] for n in DISKS)
        ok = not report.errors and not any(bad.values()) and untouched
        say(f"check: destination equals the writer's model byte for byte: "
            f"{'yes' if not any(bad.values()) else {n: len(b) for n, b in bad.items()}}")
        say(f"check: the first source was not written after its switchover: {'yes' if untouched else 'NO'}")
        say(f"check: the writer saw no error: {'yes' if not report.errors else report.errors[:3]}")
        say("demo " + ("passed" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        if writer is not None:
            writer.stop()
        stop_everything(root, agent)
        if keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
