"""The datastores' NBD export: one nbdkit (its own `file` plugin) serving them to other hosts over TLS.

Design notes
- Command line (docs/interfaces.md, section 1b):
      nbdkit --foreground --tls=require --tls-certificates=DIR --tls-verify-peer --threads 16 \
             file dir=STATE_DIR/exports
  on `[agent] nbd_listen`, handed over by socket activation as the VMs' TCP listeners are
  (agent/supervisor.py): the agent binds the port, so a port in use is its own clear error.
  TLS is required and the client's certificate must come from the site CA: no plaintext, no
  anonymous client. Read-write, and the file plugin turns NBD flush into fdatasync and FUA
  into a write followed by one, so the destination flush before the switchover stun is real.
- One nbdkit for every datastore, not one each: nbdkit listens on one address and the
  configuration has one `nbd_listen`. In `dir=` mode the plugin serves the files directly inside
  one directory by file name (no subdirectories, no slashes in export names), so that directory
  is the agent's state_dir/exports of symbolic links into the datastores, kept by
  agent/datastore.py (its notes say how exports are named). nbdkit follows those links; only the
  agent writes that directory (mode 0700).
- Like the mirror nodes, it runs detached and outlives the agent: another host's VM may run on
  these disks. A restarted agent adopts it when the pid file's process (pid and start time) is
  still running exactly the command line it would start now; otherwise (a new address or
  certificate directory) it is restarted. The supervision loop restarts it when it dies.
- Ready means serving: a libnbd client with this host's own certificate completes the NBD and
  TLS handshakes with it.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import nbd

from agent.errors import ConfigError, SvmotionError
from agent.supervisor import THREADS, Detached, tcp_listener
from agent.tls import split_address

log = logging.getLogger("svmotion.export")

READY_TIMEOUT_S = 15.0


def export_command(certificates: str, exports_dir: str) -> list[str]:
    """The export's nbdkit command line (module notes); the listener comes by socket activation."""
    return ["nbdkit", "--foreground", "--tls=require", f"--tls-certificates={certificates}", "--tls-verify-peer",
            "--threads", str(THREADS), "file", f"dir={exports_dir}"]


def probe_address(listen: str) -> tuple[str, int]:
    """Where to reach a listener from this host: a wildcard address becomes loopback."""
    host, port = split_address(listen)
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host), port


class DatastoreExport(Detached):
    """This host's datastores over NBD with TLS.

    Example: `export = DatastoreExport(cfg.nbd_listen, certs_dir, exports_dir, cfg.state_dir, cfg.source)`,
    then `export.adopt() or export.start()`.
    """

    def __init__(self, listen: str, certificates: str, exports_dir: str, state_dir: str, source: str = ""):
        super().__init__("datastore export", os.path.join(state_dir, "exports.pid"),
                         os.path.join(state_dir, "exports.nbdkit.log"))
        self.listen = listen
        self.certificates = certificates
        self.command = export_command(certificates, exports_dir)
        self._source = source

    def adopt(self) -> bool:
        """Take over the export a previous agent left running, if it runs this very command line."""
        found = self.recorded()
        if found is None:
            return False
        pid, start = found
        try:
            running = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            return False
        if running != [os.fsencode(arg) for arg in self.command]:
            log.info("datastore export: nbdkit pid %d runs another command line; restarting it", pid)
            return False
        self.pid, self._start_time = pid, start
        log.info("datastore export: adopted running nbdkit pid %d on %s", pid, self.listen)
        return True

    def start(self) -> None:
        """Start nbdkit on nbd_listen and wait until it serves TLS."""
        self._stop_stale()
        try:
            listener = tcp_listener(self.listen)
        except OSError as err:
            raise ConfigError(f"{self._source}: [agent] nbd_listen = {self.listen!r}: cannot listen "
                              f"({err.strerror}); choose a free address") from None
        self._launch(self.command, {}, [listener])
        self._wait_ready(time.monotonic() + READY_TIMEOUT_S)
        log.info("datastore export: started nbdkit pid %d on %s", self.pid, self.listen)

    def _wait_ready(self, deadline: float) -> None:
        host, port = probe_address(self.listen)
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if not self.alive():
                raise SvmotionError(f"nbdkit for the datastores exited at start: {self.log_tail()}; "
                                    f"see {self.log_file}")
            try:
                probe(host, port, self.certificates)
                return
            except nbd.Error as err:
                last_error = err.string
            time.sleep(0.05)
        self.stop()
        raise SvmotionError(f"nbdkit for the datastores did not serve TLS on {self.listen} within "
                            f"{READY_TIMEOUT_S:.0f} s ({last_error}); see {self.log_file}")


def probe(host: str, port: int, certificates: str) -> None:
    """An NBD handshake with TLS and this host's client certificate, then goodbye; raises nbd.Error."""
    h = nbd.NBD()       # closed when collected; opt_abort has ended the connection by then
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(certificates)
    h.set_tls_verify_peer(False)      # readiness only: whom we reach is not in question here
    h.set_opt_mode(True)
    h.connect_tcp(host, str(port))
    h.opt_abort()
