"""Runs inside the lab guest (chrooted into pyroot): svmotion's attach over the kernel's netlink.

Steps, each reported on the console for the host test:
1. `python3 -m agent.cli_attach attach VM DISK --uri nbd://10.0.2.2:PORT/DISK --json`: the
   project's own CLI and attach code, which must pick the kernel client (netlink), since this
   kernel has the nbd module. A second attach must answer the same device (idempotent).
2. Rounds of O_DIRECT writes of known blocks through /dev/nbdX, each round ended by fsync (an
   NBD flush), until the host says "stop" on the console (it migrates the export meanwhile).
   On "reattach" the attach command runs again (from another thread, as the writes may be
   waiting on a dead connection): after the host killed nbdkit and the agent restarted it,
   that hands the kernel a fresh socket and the held writes resume.
3. Every block read back (O_DIRECT: from the server, not the page cache) and compared.
4. `detach`, twice (the second must be a no-op), and the device must be disconnected.
The host regenerates each block from (seed, round, slot) to check the destination image.
"""
import hashlib
import json
import mmap
import os
import subprocess
import sys
import threading
import time

BLOCK = 64 * 1024


def slot_of(rnd: int, k: int, slots: int) -> int:
    return (rnd * 7 + k * 13) % slots


def say(*words: object) -> None:
    print(*words, flush=True)


def content(seed: int, rnd: int, slot: int) -> bytes:
    return hashlib.sha256(f"{seed}/{rnd}/{slot}".encode()).digest() * (BLOCK // 32)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli_attach", *args, "--state-dir", "/tmp/attach"],
                          cwd="/job", capture_output=True, text=True)


def watch_console(stop: threading.Event, attach_args: list[str]) -> None:
    """Host commands: "reattach" (attach again: a fresh socket for a dead connection), "stop"."""
    for line in sys.stdin:
        if line.strip() == "reattach":
            again = cli(*attach_args)
            say("REATTACH-RC", again.returncode, again.stderr.strip())
        if line.strip() == "stop":
            stop.set()
            return


def main() -> int:
    sys.path.insert(0, "/job")
    cfg = json.load(open("/job/config.json"))
    attach_args = ["attach", cfg["vm"], cfg["disk"], "--uri", cfg["uri"], "--json"]
    first = cli(*attach_args)
    say("ATTACH-RC", first.returncode, first.stderr.strip())
    if first.returncode:
        return 30
    att = json.loads(first.stdout)
    device = att["device"]
    say("ATTACHED", device, att["method"], att["size"])
    again = cli(*attach_args)
    same = again.returncode == 0 and json.loads(again.stdout)["device"] == device
    say("IDEMPOTENT", "yes" if same else f"no: {again.returncode} {again.stdout} {again.stderr}")
    name = os.path.basename(device)
    say("BACKEND", open(f"/sys/block/{name}/backend").read().strip())

    stop = threading.Event()
    threading.Thread(target=watch_console, args=(stop, attach_args), daemon=True).start()
    buf = mmap.mmap(-1, BLOCK)          # page-aligned, as O_DIRECT wants
    latest: dict[int, int] = {}
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    rnd = 0
    while not stop.is_set() or rnd < cfg["min_rounds"]:
        rnd += 1
        for k in range(cfg["per_round"]):
            slot = slot_of(rnd, k, cfg["slots"])
            buf.seek(0)
            buf.write(content(cfg["seed"], rnd, slot))
            os.pwritev(fd, [buf], slot * BLOCK)
            latest[slot] = rnd
        os.fsync(fd)
        say("ROUND", rnd)
        time.sleep(cfg["pause"])
    bad = 0
    for slot, r in sorted(latest.items()):
        os.preadv(fd, [buf], slot * BLOCK)
        if bytes(buf) != content(cfg["seed"], r, slot):
            bad += 1
            say("MISMATCH", slot, r)
    os.close(fd)
    say("VERIFIED", len(latest), "blocks", bad, "bad")
    for slot, r in sorted(latest.items()):
        say("BLOCK", slot, r)
    first_detach = cli("detach", device)
    second_detach = cli("detach", device)
    say("DETACH-RC", first_detach.returncode, first_detach.stdout.strip(), first_detach.stderr.strip())
    say("DETACH-AGAIN-RC", second_detach.returncode, second_detach.stdout.strip())
    backend = ""
    if os.path.exists(f"/sys/block/{name}/backend"):
        backend = open(f"/sys/block/{name}/backend").read().strip()
    say("AFTER-DETACH-BACKEND", backend or "-")
    return 0 if bad == 0 and same else 31


if __name__ == "__main__":
    sys.exit(main())
