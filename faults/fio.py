"""fio as the independent verifier: random writes with crc32c headers, replayed later to verify.

Design notes
- Why each block is written once. fio 3.33's `--verify_only` replay checks a block's magic,
  length, offset and crc32c, but not the seed or the sequence number in its header (measured
  here: a block put back to an *older fio write* of the same offset passes, even when replayed
  with a wrong seed). So with overwrites a lost write could hide behind fio's own previous data.
  fio therefore writes every block of its area at most once per trial: a lost write leaves the
  pre-fio content (the disk's pattern or zeroes), which fails the magic check. Overwrites are
  the VerifyingWriter's job (its model tracks a generation per block). The self-test
  (selftest.py) proves the lost write is caught.
- fio owns the first half of every disk and writes it in *rounds* of about `round_s` seconds:
  round r writes the r-th sub-region of every disk that has one left (one job per disk, one
  process, `--thread`), `randwrite` with fio's random map, so each block of the sub-region is
  written exactly once, in random order, with crc32c headers. The rate per disk is chosen so that
  the area lasts FIO_SPAN_S seconds; a disk whose area is used up gets no more jobs.
- Each round verifies itself at its end (`do_verify=1`: fio reads its sub-region back through
  the server, with the seeds and sequence numbers of that very run): a read-after-write check
  *during* the migration. After the migration every completed round is replayed with
  `--verify_only` against what nbdkit serves now. A round cut short (its server killed) is not
  replayable (fio cannot say which of its writes were acknowledged: its `verify_state_save` is
  written when a job exits, and the nbd engine never exits while requests are in flight on a dead
  server); the VerifyingWriter, which tracks each acknowledgement, covers those writes.
- Bounding fio: `--runtime` per round, a watchdog that SIGKILLs it past that, and a reader that
  keeps only the first and last 16 KiB of its output and kills it at the first
  "nbd_poll ... state DEAD" (the nbd engine otherwise loops forever printing that line).
- The server dying (nbdkit killed) fails the round; the next round waits until the VM's socket
  answers again (the agent restarts nbdkit), as a guest would reconnect.
- Verification can also read a raw file (`--ioengine=psync`): the same replay checks the file an
  agent *believes* the VM runs on, when that is not what nbdkit serves.
"""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nbd

from faults.params import FioParams
from faults.resources import Resources

HEAD = TAIL = 16 * 1024
DEAD_MARK = "state DEAD"
VERIFY_ERROR = re.compile(r"(?P<what>[^\n]*?) at file (?P<file>\S+) offset (?P<offset>\d+), length (?P<length>\d+)")
SERVER_WAIT_S = 60.0
FIO_SPAN_S = 25.0           # fio's area of a disk lasts this long at its rate
MIN_SUB_BLOCKS = 16


@dataclass
class Round:
    index: int
    seeds: dict[str, int]         # disk -> randseed (the disks that have a sub-region left)
    started: float = 0.0          # time.monotonic()
    ended: float = 0.0
    complete: bool = False
    bad: list[tuple[str, int, str]] = field(default_factory=list)   # read-after-write mismatches
    errors: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    """What a verification found: bad blocks (disk, offset, why), what it could not verify."""
    verified_bytes: int = 0
    bad: list[tuple[str, int, str]] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)     # "round 12 (cut short)"
    errors: list[str] = field(default_factory=list)           # fio itself failed

    def summary(self) -> str:
        first = "; ".join(f"{d}@{o:#x}: {w}" for d, o, w in self.bad[:3])
        return (f"{len(self.bad)} bad blocks{': ' + first if first else ''}; "
                f"{self.verified_bytes >> 10} KiB verified; {len(self.unverifiable)} rounds unverifiable"
                + (f"; fio errors: {'; '.join(self.errors[:2])}" if self.errors else ""))


class BoundedReader(threading.Thread):
    """Reads a process's output, keeping its head and tail; kills the process at `kill_mark`."""

    def __init__(self, proc: subprocess.Popen, kill_mark: str | None = DEAD_MARK):
        super().__init__(daemon=True, name=f"fio-reader-{proc.pid}")
        self.proc, self.kill_mark = proc, kill_mark
        self.head, self.tail, self.dropped, self.marked = b"", b"", 0, False

    def run(self) -> None:
        while chunk := self.proc.stdout.read1(4096):
            if self.kill_mark and not self.marked and self.kill_mark.encode() in self.tail[-200:] + chunk:
                self.marked = True
                self.proc.kill()
            room = HEAD - len(self.head)
            self.head += chunk[:room]
            self.tail = (self.tail + chunk[room:])[-TAIL:]
            self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        gap = f"\n[... {self.dropped - len(self.tail)} bytes dropped ...]\n" if self.dropped > len(self.tail) else ""
        return (self.head + gap.encode() + self.tail).decode(errors="replace")


def server_answers(uri: str) -> bool:
    """A whole NBD handshake (a bare connect would leave nbdkit's log full of broken handshakes)."""
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        h.shutdown()
        return True
    except nbd.Error:
        return False


def verify_errors(text: str, disk_of: Callable[[str], str]) -> list[tuple[str, int, str]]:
    """fio's verify failures in its output: (disk, offset, what)."""
    return [(disk_of(m.group("file")), int(m.group("offset")), m.group("what").removeprefix("verify: ").strip())
            for m in VERIFY_ERROR.finditer(text)]


class FioWorkload:
    """fio rounds on the first half of every disk of a VM, in a background thread.

    Example: `w = FioWorkload(sizes, sock, params, seed, dir, res); w.start(); ...; w.stop();
    verdict = w.verify(lambda disk: ("nbd", uri))`
    """

    def __init__(self, sizes: dict[str, int], nbd_socket: Path, params: FioParams, seed: int,
                 workdir: Path, res: Resources):
        self.sizes, self.socket, self.params, self.seed = sizes, nbd_socket, params, seed
        self.workdir, self.res = workdir, res
        workdir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[Round] = []
        self.logs: list[str] = []          # output excerpts of rounds that failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- layout ----------------------------------------------------------------------------

    def area(self, disk: str) -> int:
        """fio's part of the disk: [0, area)."""
        return self.sizes[disk] // 2

    def rate(self, disk: str) -> int:
        """Bytes/s of this disk's job: the drawn rate, or less, so the area lasts FIO_SPAN_S."""
        return max(4096, min(self.params.rate, int(self.area(disk) / FIO_SPAN_S)) // 4096 * 4096)

    def sub_size(self, disk: str) -> int:
        """What one round writes on a disk."""
        bs = self.params.bs
        return max(MIN_SUB_BLOCKS * bs, int(self.rate(disk) * self.params.round_s) // bs * bs)

    def subregions(self, disk: str) -> int:
        return self.area(disk) // self.sub_size(disk)

    def round_seconds(self) -> float:
        return max(self.sub_size(d) / self.rate(d) for d in self.sizes)

    def exhausted(self) -> bool:
        return all(len(self.rounds) >= self.subregions(d) for d in self.sizes)

    # ---- rounds ----------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fio-rounds", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the running round finish (it is bounded), start no other."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.round_seconds() * 3 + 40)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set() and not self.exhausted():
            if self.rounds and self.rounds[-1].errors:
                # The server may be down (nbdkit killed): wait for the agent to bring it back.
                uri = f"nbd+unix:///{next(iter(self.sizes))}?socket={self.socket}"
                deadline = time.monotonic() + SERVER_WAIT_S
                while not server_answers(uri) and time.monotonic() < deadline:
                    if self._stop.wait(0.2):
                        return
            index = len(self.rounds)
            seeds = {d: (self.seed * 7919 + index * 131 + i) % 2**31 + 1
                     for i, d in enumerate(self.sizes) if index < self.subregions(d)}
            rnd = Round(index, seeds)
            self.rounds.append(rnd)
            self._write_round(rnd)

    def _common(self) -> list[str]:
        p = self.params
        return ["fio", "--thread", "--rw=randwrite", f"--bs={p.bs}", f"--iodepth={p.iodepth}",
                "--verify=crc32c", "--randrepeat=1", "--verify_state_save=0", f"--fsync={p.fsync}"]

    def _job(self, rnd: Round, disk: str, target: list[str]) -> list[str]:
        sub = self.sub_size(disk)
        return [f"--name={disk}-r{rnd.index}", *target, f"--offset={rnd.index * sub}", f"--size={sub}",
                f"--randseed={rnd.seeds[disk]}"]

    def _write_round(self, rnd: Round) -> None:
        runtime = int(self.round_seconds() * 3) + 5
        out = self.workdir / f"round-{rnd.index}.json"
        argv = [*self._common(), "--ioengine=nbd", "--do_verify=1", "--exitall_on_error",
                f"--runtime={runtime}", "--output-format=json", f"--output={out}"]
        for disk in rnd.seeds:
            argv += [*self._job(rnd, disk, [f"--uri=nbd+unix:///{disk}?socket={self.socket}"]),
                     f"--rate={self.rate(disk)}"]
        rnd.started = time.monotonic()
        code, text, report = self._run_fio(argv, out, runtime + 10)
        rnd.ended = time.monotonic()
        rnd.bad = verify_errors(text, lambda f: f.split("-r")[0])
        jobs = {j["jobname"]: j for j in (report or {}).get("jobs", [])}
        for disk in rnd.seeds:
            job = jobs.get(f"{disk}-r{rnd.index}")
            if job is None:
                rnd.errors.append(f"{disk}: no fio report")
            elif job["error"]:
                rnd.errors.append(f"{disk}: fio error {job['error']}")
            elif job["write"]["io_bytes"] != self.sub_size(disk) or job["read"]["io_bytes"] != self.sub_size(disk):
                rnd.errors.append(f"{disk}: wrote {job['write']['io_bytes']}, read back {job['read']['io_bytes']} "
                                  f"of {self.sub_size(disk)} bytes")
        if code != 0:
            rnd.errors.append(f"fio exited {code}")
        rnd.complete = not rnd.errors and not rnd.bad
        if rnd.errors or rnd.bad:
            rnd.errors += [line for line in text.splitlines() if line.startswith("fio:")][:3]
            self.logs.append(f"round {rnd.index}: {'; '.join(rnd.errors)}\n{text[:2000]}")

    def _run_fio(self, argv: list[str], out: Path, timeout: float) -> tuple[int, str, dict | None]:
        """Run fio bounded in time and output; (exit code, output excerpt, JSON report or None)."""
        proc = self.res.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.workdir)
        reader = BoundedReader(proc)
        reader.start()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            reader.join(5)
            return code, f"fio killed after {timeout:.0f} s\n{reader.text()}", None
        reader.join(5)
        text = reader.text()
        if reader.marked:
            text = f"fio killed: its NBD server died ({DEAD_MARK})\n{text}"
        return code, text, read_report(out)

    # ---- verification -------------------------------------------------------------------------

    def verify(self, target: Callable[[str], tuple[str, str]]) -> Verdict:
        """Replay every completed round against `target(disk)`: ("nbd", uri) or ("file", path)."""
        verdict = Verdict()
        replay = [(rnd, disk) for rnd in self.rounds if rnd.complete for disk in rnd.seeds]
        verdict.unverifiable = [f"round {rnd.index} (cut short)" for rnd in self.rounds if not rnd.complete]
        for engine in ("nbd", "file"):
            jobs = [(rnd, disk) for rnd, disk in replay if target(disk)[0] == engine]
            if jobs:
                self._verify_jobs(jobs, engine, target, verdict)
        return verdict

    def _verify_jobs(self, jobs: list[tuple[Round, str]], engine: str,
                     target: Callable[[str], tuple[str, str]], verdict: Verdict) -> None:
        out = self.workdir / f"verify-{len(self.rounds)}-{engine}-{time.monotonic_ns()}.json"
        argv = [*self._common(), "--ioengine=nbd" if engine == "nbd" else "--ioengine=psync",
                "--verify_only", "--verify_state_load=0", "--continue_on_error=verify",
                "--output-format=json", f"--output={out}"]
        by_path = {}
        for rnd, disk in jobs:
            where = target(disk)[1]
            by_path[where] = disk
            argv += self._job(rnd, disk, [f"--uri={where}"] if engine == "nbd" else [f"--filename={where}"])
        code, text, report = self._run_fio(argv, out, 120)
        # nbd: fio names the "file" after the job (diskN-rM.0.0); psync: the path itself.
        verdict.bad += verify_errors(text, lambda f: by_path.get(f) or f.split("-r")[0])
        got = {j["jobname"]: j for j in (report or {}).get("jobs", [])}
        for rnd, disk in jobs:
            name, size = f"{disk}-r{rnd.index}", self.sub_size(disk)
            job = got.get(name)
            if job is None:
                verdict.errors.append(f"{name}: no fio report (exit {code}): {text[-300:]}")
                continue
            verdict.verified_bytes += job["read"]["io_bytes"]
            flagged = any(d == disk and rnd.index * size <= o < (rnd.index + 1) * size for d, o, _ in verdict.bad)
            if job["error"] and not flagged:
                verdict.errors.append(f"{name}: fio error {job['error']}: {text[-300:]}")
            elif job["read"]["io_bytes"] < size and not flagged:
                verdict.errors.append(f"{name}: verified {job['read']['io_bytes']} of {size} bytes")


def read_report(path: Path) -> dict | None:
    """fio's JSON report; fio prints its own info lines before the JSON, in the same file."""
    try:
        if path.stat().st_size > 4 << 20:
            return None
        text = path.read_text(errors="replace")
        return json.loads(text[text.index("{"):])
    except (OSError, ValueError):
        return None
