"""QEMU's block mirror as the operator's alternative: qemu-storage-daemon + blockdev-mirror over QMP.

Design notes
- The guest writes to the source through the daemon's NBD export, exactly as it writes through
  the mirror node; `blockdev-mirror` (sync=full, copy-mode background or write-blocking) copies
  to a pre-created raw target; `job-complete` pivots the export onto the target. The pivot is
  QEMU's switchover: the guest-visible pause is the longest latency of any guest request in the
  system between sending `job-complete` and the BLOCK_JOB_COMPLETED event.
- Copy amplification, measured honestly: QEMU keeps no per-node write counters
  (query-blockstats reports zero wr_bytes for nodes without a BlockBackend, which the mirror's
  target is), so target bytes = the daemon's `wchar` growth (bytes passed to write-family
  syscalls) minus the guest's bytes completed in the same interval (each guest write reaches the
  source file once). Replies to NBD clients and QMP go through sendmsg and are not counted.
  The error is bounded by the requests in flight at each reading (queue depth x 4 KiB).
- Over TLS (issue 11's anchor, what libvirt's --copy-storage-all --tls sets up): the target is
  another daemon, QEMU's NBD server on TCP with tls-creds (verify-peer), and the source daemon
  attaches it as an `nbd` node with client tls-creds (or a file behind svmotion's nbdkit TLS
  export, the same destination the mirror node gets). QEMU 7.2's NBD server leaves Nagle on for
  its TCP clients (its client, like libnbd, sets TCP_NODELAY; seen with strace), so replies from
  that server can wait for a delayed ACK (40 ms). The guest still reaches the source daemon
  over a Unix socket, as it reaches the mirror node, so the guest's own path has no TCP in it;
  only the mirror's traffic crosses TCP, from QEMU's NBD client. Copy amplification is not
  counted here: the target's writes are in the other process.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from . import images, procs
from .loadgen import LoadGen, Trace
from .qmp import QMPClient, QMPError
from .remote import Export, Pki

READY_TIMEOUT = 90.0
PIVOT_TIMEOUT = 60.0


@dataclass
class QemuMirrorRun:
    """One mirror from start to pivot, with the guest trace around it."""

    mode: str
    size: int
    started: float = 0.0
    ready: float = 0.0            # BLOCK_JOB_READY received
    complete_sent: float = 0.0
    completed: float = 0.0        # BLOCK_JOB_COMPLETED received
    target_bytes_ready: int = 0
    target_bytes_done: int = 0
    converged: bool = True        # reached READY and then pivoted
    stalled: str = ""             # why not, when it did not
    trace: Trace | None = None
    command: str = ""

    @property
    def mirror_seconds(self) -> float:
        return self.ready - self.started

    @property
    def pivot_wait(self) -> float:
        """The longest guest-visible wait around the pivot."""
        assert self.trace is not None
        return self.trace.max_wait(self.complete_sent, self.completed)


def mirror_run(work: str, source: str, size: int, mode: str, load_rate: float | None,
               pre_seconds: float = 1.5, ready_seconds: float = 0.5,
               loadgen_span: int = 0, tls: Pki | None = None, export: Export | None = None,
               ready_timeout: float = READY_TIMEOUT, pivot_timeout: float = PIVOT_TIMEOUT,
               after_seconds: float = 0.2, target_node: list[str] | None = None) -> QemuMirrorRun:
    """Mirror `source` to a fresh target under an optional guest load (None = idle, 0 = max rate);
    with `tls`, the target is another daemon's NBD export over TLS (module notes), or a file
    behind `export` when one is given; `target_node` is a target the caller made and serves
    (qemu_nbd_unix_target: a slowed destination), its target bytes then not counted. The load
    runs on for `after_seconds` after the pivot (the guest served from the target)."""
    target = os.path.join(export.directory if export else work, "qemu-target.raw")
    if target_node is None:
        images.make_empty(target, size)
    sock, qmp_path = os.path.join(work, "qsd.sock"), os.path.join(work, "qsd.qmp")
    run = QemuMirrorRun(mode, size)
    server: procs.Service | None = None
    if target_node is None and tls is None:
        target_node = procs.qemu_file_target(target)
    elif target_node is None and export is not None:
        target_node = procs.qemu_nbd_tls_target(export.port, os.path.basename(target), tls.client)
    elif target_node is None:
        server, port = procs.start_on_free_port(
            lambda p: procs.qemu_tls_nbd_server(target, p, tls.server, work))
        target_node = procs.qemu_nbd_tls_target(port, "disk0", tls.client)
    daemon = procs.qemu_storage_daemon(source, target_node, sock, qmp_path, work)
    run.command = ((server.command + "\n") if server else "") + daemon.command + \
        f"  # QMP: blockdev-mirror sync=full copy-mode={mode}; job-complete"
    loadgen = None
    try:
        daemon.start()
        qmp = QMPClient(qmp_path)
        if load_rate is not None:
            loadgen = LoadGen([procs.nbd_uri(sock, "disk0")], os.path.join(work, "qemu-load"),
                              rate=load_rate, span=loadgen_span).start()
            time.sleep(pre_seconds)
        w0 = procs.written_chars(daemon.pid)
        run.started = time.monotonic()
        qmp.execute("blockdev-mirror", **{"job-id": "mirror0", "device": "src", "target": "tgt",
                                          "sync": "full", "copy-mode": mode})
        try:
            run.ready = qmp.wait_event("BLOCK_JOB_READY", ready_timeout)["_received"]
        except QMPError:
            run.converged = False
            run.stalled = f"no READY within {ready_timeout:.0f} s"
            run.ready = time.monotonic()
        w_ready, t_w_ready = procs.written_chars(daemon.pid), time.monotonic()
        if run.converged:
            time.sleep(ready_seconds)  # a mirror in READY state keeps mirroring; then pivot
            run.complete_sent = time.monotonic()
            qmp.execute("job-complete", id="mirror0")
            try:
                run.completed = qmp.wait_event("BLOCK_JOB_COMPLETED", pivot_timeout)["_received"]
            except QMPError:
                # The pivot waits for a clean dirty bitmap; guest writes that dirty it faster
                # than the mirror copies keep it from ever coming.
                run.converged = False
                run.stalled = f"no pivot within {pivot_timeout:.0f} s of job-complete"
        if not run.converged:
            qmp.execute("block-job-cancel", device="mirror0", force=True)
        w_done, t_w_done = procs.written_chars(daemon.pid), time.monotonic()
        if loadgen is not None:
            time.sleep(after_seconds)
            run.trace = loadgen.stop()
            guest_ready = run.trace.completed_bytes(run.started, t_w_ready)
            guest_done = run.trace.completed_bytes(run.started, t_w_done)
        else:
            guest_ready = guest_done = 0
        run.target_bytes_ready = (w_ready - w0) - guest_ready
        run.target_bytes_done = (w_done - w0) - guest_done
        qmp.close()
    finally:
        if loadgen is not None:
            loadgen.kill()
        daemon.stop()
        if server is not None:
            server.stop()
        if os.path.exists(target):
            os.unlink(target)
    return run
