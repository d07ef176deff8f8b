"""External reference tools: fio's nbd engine (passthrough IOPS / MB/s), nbdcopy and cp (copy rate).

Design notes
- fio runs time-based with its JSON output parsed for write IOPS and bytes/s; the same job
  file is pointed at nbdkit's C `file` plugin and at the mirror node, so only the server differs.
- Copies are timed wall-clock from the tool's start until its copy is durable (the harness
  fdatasyncs the destination after the tool exits), source in page cache (it was just written),
  the destination a new file that is deleted afterwards. The mirror node's bulk copy is timed
  the same way, through flush_dest: its copier writes behind itself (nbd_plugin/copier.py), so a
  copy that stopped at the page cache would compare a durable copy with a cached one.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import time


class ToolError(RuntimeError):
    """An external tool failed."""


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise ToolError(f"{shlex.join(argv)} exited {result.returncode}: {result.stderr.strip()[-300:]}")
    return result


def fio_argv(uri: str, rw: str, bs: str, iodepth: int, seconds: float) -> list[str]:
    return ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={iodepth}", "--numjobs=1", "--time_based", f"--runtime={seconds:g}",
            f"--ramp_time={1 if seconds >= 3 else 0}", "--randrepeat=0", "--output-format=json"]


def fio_write(uri: str, rw: str, bs: str, iodepth: int, seconds: float) -> dict[str, float]:
    """Run one fio write job against an NBD URI; {iops, bytes_per_s}."""
    result = run(fio_argv(uri, rw, bs, iodepth, seconds), timeout=seconds + 60)
    # fio may print warnings before the JSON document.
    text = result.stdout[result.stdout.index("{"):]
    job = json.loads(text)["jobs"][0]
    if job.get("error"):
        raise ToolError(f"fio {rw} on {uri}: job error {job['error']}")
    return {"iops": float(job["write"]["iops"]), "bytes_per_s": float(job["write"]["bw_bytes"])}


def timed_copy(argv: list[str], dest: str, timeout: float = 300) -> float:
    """Run a copy command that creates `dest`; its wall-clock seconds until `dest` is durable.

    `dest` is removed afterwards."""
    if os.path.exists(dest):
        os.unlink(dest)
    start = time.monotonic()
    run(argv, timeout)
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    seconds = time.monotonic() - start
    os.unlink(dest)
    return seconds


def nbdcopy_argv(source: str, dest: str, flush: bool = False) -> list[str]:
    """nbdcopy's command; `flush`: the destination flushed before it exits (an NBD destination,
    whose file the harness cannot fdatasync through the server)."""
    return ["nbdcopy", *(["--flush"] if flush else []), source, dest]


def cp_argv(source: str, dest: str) -> list[str]:
    return ["cp", "--sparse=auto", source, dest]
