"""Prometheus metrics of the agent: one module owns every metric name, label and bucket.

Design notes
- Two sources. What only the agent knows (stun times, phase times, the current phase, passes,
  outcomes, nbdkit liveness) is recorded by the phase engine through the small functions below.
  What the data path knows (bytes copied, dirty bytes, guest writes, write latency, backend
  errors) lives in the plugin; a collector asks the agent for every VM's plugin `status` reply
  (docs/interfaces.md section 2) at scrape time and turns it into metric families, so a scrape
  always shows the plugin's own cumulative counters and nothing is sampled or parsed from logs.
- `REGISTRY` is this module's own CollectorRegistry, not the process-wide default, so tests can
  build a fresh one with `reset()` and read values with `REGISTRY.get_sample_value()`.
- Stun buckets are dense around the millisecond: 0.5 ms, 5 ms and 100 ms fall in different
  buckets with at least one bucket boundary between each pair.
- Counters of a VM are exported at 0 as soon as the VM is known (set_nbdkit_up, set_phase), so
  the first failure is a 0 -> 1 step that `increase()` and the alert rules can see; for the
  same reason every known backend error `side:op` pair is exported at 0 (ERROR_OPS).
- `svmotion_migration_phase` is a state-set gauge: every phase of a known VM is exported, 1 for
  the current phase and 0 for the others, so a Grafana state timeline and `== 1` selectors work
  and a finished migration shows all zeros rather than a stale 1.

Example:
    >>> from agent import metrics
    >>> metrics.observe_stun("vm1", "switchover", "optimized", 0.004, 0.003)
    >>> server = metrics.serve("127.0.0.1:0")   # server.server_port is the bound port
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

DEFAULT_ADDR = "127.0.0.1:9815"

PHASES = (
    "Null", "DiskSetup", "DiskCreate", "DiskLoad", "FileCreate", "Stun", "Unstun", "DiskCopy",
    "CopyDirtyInfo", "CopyDirtyData", "DiskCopyDone", "Complete", "Cleanup",
)
STUN_KINDS = ("mirror_install", "switchover")
RESULTS = ("success", "aborted", "failed")
VERIFY_RESULTS = ("match", "mismatch", "error")

# 100 us .. 5 s: a stun is normally a few ms; anything near the 2 s lease is a failure.
STUN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 0.5, 1.0, 2.0, 5.0)
# 1 ms .. 1 h: validation phases take ms, a bulk copy of a large disk takes minutes.
PHASE_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)

try:
    from importlib.metadata import version as _dist_version
    VERSION = _dist_version("svmotion")
except Exception:  # not installed (running from a source tree)
    VERSION = "0.0.0"

# The plugin's backend error counters (nbd_plugin: disk.py, mirror.py, copier.py, vm.py).
ERROR_OPS = {"source": ("pread", "pwrite", "flush", "trim", "zero"),
             "dest": ("pwrite", "flush", "trim", "zero", "copy", "write_back")}
ZERO_ERRORS = {f"{side}:{op}": 0.0 for side, ops in ERROR_OPS.items() for op in ops}

StatusSource = Callable[[], dict[str, dict]]


class _AgentMetrics:
    """The agent-side metric objects, all registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.stun = Histogram(
            "svmotion_stun_duration_seconds",
            "Duration of a stun (guest requests held), by kind and strategy.",
            ["vm", "kind", "strategy"], buckets=STUN_BUCKETS, registry=registry)
        self.guest_wait = Histogram(
            "svmotion_stun_guest_wait_seconds",
            "Longest wait of any held guest request in a stun: what the guest felt.",
            ["vm", "kind", "strategy"], buckets=STUN_BUCKETS, registry=registry)
        self.phase_duration = Histogram(
            "svmotion_phase_duration_seconds", "Duration of a migration phase.",
            ["vm", "phase"], buckets=PHASE_BUCKETS, registry=registry)
        self.phase = Gauge(
            "svmotion_migration_phase", "1 for the current migration phase of the VM, else 0.",
            ["vm", "phase"], registry=registry)
        self.passes = Counter(
            "svmotion_dirty_passes", "Dirty copy passes run (CopyDirtyData).",
            ["vm"], registry=registry)
        self.predicted_stun = Gauge(
            "svmotion_predicted_switchover_stun_seconds",
            "Switchover stun predicted from the dirty bytes left and the measured copy rate.",
            ["vm"], registry=registry)
        self.stalled = Gauge(
            "svmotion_migration_stalled",
            "1 while the VM's migration does not converge with the guest throttle at its bound "
            "(the operator chooses: raise --max-throttle, switch to a sync mirror, or abort).",
            ["vm"], registry=registry)
        self.migrations = Counter(
            "svmotion_migrations", "Migrations finished, by result.",
            ["vm", "result"], registry=registry)
        self.verifications = Counter(
            "svmotion_verifications", "Verifications of disks against a reference by per-chunk digests "
            "(migrate --verify, svmotion verify), by result.", ["vm", "result"], registry=registry)
        self.verified_bytes = Counter(
            "svmotion_verified_bytes", "Bytes compared equal by verifications.", ["vm"], registry=registry)
        self.verify_skipped_bytes = Counter(
            "svmotion_verify_skipped_bytes",
            "Bytes a verification skipped: rewritten by the guest since the switchover.",
            ["vm"], registry=registry)
        self.nbdkit_up = Gauge(
            "svmotion_nbdkit_up", "1 when the VM's nbdkit answers its control socket.",
            ["vm"], registry=registry)
        self.agent_up = Gauge("svmotion_agent_up", "1 while the agent runs.", registry=registry)
        self.agent_info = Gauge(
            "svmotion_agent_info", "Agent build information (always 1).", ["version"],
            registry=registry)
        self.agent_up.set(1)
        self.agent_info.labels(version=VERSION).set(1)


REGISTRY: CollectorRegistry
_m: _AgentMetrics
_plugin_collector: "PluginCollector | None" = None
_lock = threading.Lock()  # protects the rebinding of REGISTRY/_m and the plugin collector


def reset() -> CollectorRegistry:
    """Start over on a fresh registry (tests); returns it. A running `serve()` follows it."""
    global REGISTRY, _m, _plugin_collector
    with _lock:
        REGISTRY = CollectorRegistry(auto_describe=True)
        _m = _AgentMetrics(REGISTRY)
        _plugin_collector = None
        return REGISTRY


reset()


def _check(value: str, allowed: Iterable[str], what: str) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")
    return value


def observe_stun(vm: str, kind: str, strategy: str, duration_s: float, max_wait_s: float) -> None:
    """Record one stun: its duration and the longest wait of a held guest request."""
    _check(kind, STUN_KINDS, "stun kind")
    _m.stun.labels(vm=vm, kind=kind, strategy=strategy).observe(duration_s)
    _m.guest_wait.labels(vm=vm, kind=kind, strategy=strategy).observe(max_wait_s)


def _declare_vm(vm: str) -> None:
    """Export the VM's counters at 0 before anything happens to them.

    Why: `increase()` cannot see the first step of a series that is born at 1, so a VM's first
    failed migration would never fire SvmotionMigrationFailed.
    """
    for result in RESULTS:
        _m.migrations.labels(vm=vm, result=result)
    for result in VERIFY_RESULTS:
        _m.verifications.labels(vm=vm, result=result)
    _m.verified_bytes.labels(vm=vm)
    _m.verify_skipped_bytes.labels(vm=vm)
    _m.passes.labels(vm=vm)
    _m.stalled.labels(vm=vm)


def observe_phase(vm: str, phase: str, seconds: float) -> None:
    """Record how long one phase of a migration took."""
    _check(phase, PHASES, "phase")
    _m.phase_duration.labels(vm=vm, phase=phase).observe(seconds)


def set_phase(vm: str, phase: str | None) -> None:
    """Mark the VM's current phase (None: no migration running, every phase 0)."""
    if phase is not None:
        _check(phase, PHASES, "phase")
    _declare_vm(vm)
    for name in PHASES:
        _m.phase.labels(vm=vm, phase=name).set(1 if name == phase else 0)


def count_pass(vm: str) -> None:
    """Count one dirty copy pass."""
    _m.passes.labels(vm=vm).inc()


def set_predicted_stun(vm: str, seconds: float) -> None:
    """Publish the switchover stun predicted from remaining bytes and copy rate."""
    _m.predicted_stun.labels(vm=vm).set(seconds)


def set_stalled(vm: str, stalled: bool) -> None:
    """Publish whether the VM's migration is stalled (agent/convergence.py)."""
    _m.stalled.labels(vm=vm).set(1 if stalled else 0)


def count_migration(vm: str, result: str) -> None:
    """Count a finished migration: success, aborted or failed."""
    _check(result, RESULTS, "migration result")
    _m.migrations.labels(vm=vm, result=result).inc()


def count_verification(vm: str, result: str, verified_bytes: int = 0, skipped_bytes: int = 0) -> None:
    """Count one verification: match, mismatch or error, and the bytes it compared and skipped."""
    _check(result, VERIFY_RESULTS, "verification result")
    _declare_vm(vm)
    _m.verifications.labels(vm=vm, result=result).inc()
    _m.verified_bytes.labels(vm=vm).inc(verified_bytes)
    _m.verify_skipped_bytes.labels(vm=vm).inc(skipped_bytes)


def set_nbdkit_up(vm: str, up: bool) -> None:
    """Publish whether the VM's nbdkit is alive (the agent calls it when it starts the VM)."""
    _declare_vm(vm)
    _m.nbdkit_up.labels(vm=vm).set(1 if up else 0)


class PluginCollector(Collector):
    """Turns each VM's plugin `status` reply into data-path metric families at scrape time.

    `statuses()` returns {vm: status reply}; a reply holds `disks: {NAME: DiskStatus}`. A VM
    whose reply is missing or malformed is skipped (its nbdkit_up says why), never the scrape.
    """

    def __init__(self, statuses: StatusSource) -> None:
        self._statuses = statuses

    def describe(self) -> list:
        # Empty: the families depend on live data; don't make the registry call collect() early.
        return []

    def collect(self) -> Iterable:
        families = _plugin_families()
        try:
            replies = self._statuses() or {}
        except Exception as exc:  # the scrape must survive a VM that cannot answer
            log.warning("metrics: plugin status unavailable: %s", exc)
            replies = {}
        for vm, reply in sorted(replies.items()):
            for disk, status in sorted(((reply or {}).get("disks") or {}).items()):
                try:
                    _add_disk(families, vm, disk, status)
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("metrics: bad status of %s/%s skipped: %s", vm, disk, exc)
        return list(families.values())


def _plugin_families() -> dict[str, object]:
    vd = ["vm", "disk"]
    return {
        "copied": CounterMetricFamily(
            "svmotion_copied_bytes", "Bytes copied to the destination by the copier, by kind (bulk, dirty, load).",
            labels=vd + ["kind"]),
        "guest": CounterMetricFamily(
            "svmotion_guest_written_bytes", "Bytes written by the guest.", labels=vd),
        "dirtied": CounterMetricFamily(
            "svmotion_dirtied_bytes", "Bytes marked dirty (not yet on the destination).",
            labels=vd),
        "dirty": GaugeMetricFamily(
            "svmotion_dirty_bytes", "Bytes the destination does not have yet (convergence).",
            labels=vd),
        "latency": HistogramMetricFamily(
            "svmotion_guest_write_latency_seconds",
            "Guest write latency through the mirror node.", labels=vd),
        "errors": CounterMetricFamily(
            "svmotion_backend_errors", "Backend IO errors, by side and op.",
            labels=vd + ["side", "op"]),
        "throttled": CounterMetricFamily(
            "svmotion_guest_throttle_seconds",
            "Seconds guest writes spent delayed by the convergence throttle.", labels=vd),
        "throttle": GaugeMetricFamily(
            "svmotion_guest_throttle_delay_seconds",
            "The convergence throttle's current delay before each guest write (0: none).", labels=vd),
    }


def _add_disk(families: dict, vm: str, disk: str, status: dict) -> None:
    """Add one disk's DiskStatus to the families (raises on a malformed status)."""
    copied = status["copied_bytes"]
    latency = status["write_latency"]
    buckets = _latency_buckets(latency)
    # Validate everything before adding anything, so a bad disk adds no partial samples.
    reported = {key: float(n) for key, n in (status.get("errors") or {}).items()}
    for key in reported:
        if len(key.split(":")) != 2:
            raise ValueError(f"error key {key!r} is not 'side:op'")
    # Known side:op pairs at 0 unless reported, so the first error is a step rate() can see.
    errors = [(key.split(":"), n) for key, n in sorted({**ZERO_ERRORS, **reported}.items())]
    # A mirror node older than the throttle (issue 12) reports neither figure.
    throttle = ((float(status["throttled_seconds"]), float(status["throttle_seconds"]))
                if "throttled_seconds" in status else None)
    for kind in ("bulk", "dirty"):
        families["copied"].add_metric([vm, disk, kind], float(copied[kind]))
    if "load" in copied:   # DiskLoad's copies; a mirror node older than DiskLoad has none
        families["copied"].add_metric([vm, disk, "load"], float(copied["load"]))
    families["guest"].add_metric([vm, disk], float(status["guest_written_bytes"]))
    families["dirtied"].add_metric([vm, disk], float(status["dirtied_bytes"]))
    families["dirty"].add_metric([vm, disk], float(status["dirty_bytes"]))
    families["latency"].add_metric([vm, disk], buckets, sum_value=float(latency["sum"]))
    if throttle is not None:
        families["throttled"].add_metric([vm, disk], throttle[0])
        families["throttle"].add_metric([vm, disk], throttle[1])
    for (side, op), n in errors:
        families["errors"].add_metric([vm, disk, side, op], n)


def _latency_buckets(latency: dict) -> list[tuple[str, float]]:
    """The plugin's cumulative buckets as (le, count) pairs ending with +Inf = count."""
    bounds, counts = latency["le"], latency["counts"]
    if len(bounds) != len(counts):
        raise ValueError(f"write_latency has {len(bounds)} bounds but {len(counts)} counts")
    pairs = [(_le(b), float(c)) for b, c in zip(bounds, counts) if b != float("inf")]
    pairs.append(("+Inf", float(latency["count"])))
    return pairs


def _le(bound: float) -> str:
    return repr(float(bound))


def register_plugin_collector(statuses: StatusSource) -> PluginCollector:
    """Export the data-path figures of every VM from `statuses()` (called at each scrape).

    A second call replaces the first collector.
    """
    global _plugin_collector
    with _lock:
        if _plugin_collector is not None:
            REGISTRY.unregister(_plugin_collector)
        _plugin_collector = PluginCollector(statuses)
        REGISTRY.register(_plugin_collector)
        return _plugin_collector


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per scrape, so a slow plugin status never blocks another scraper."""
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
        pass


def parse_addr(addr: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6]:port") into (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics address {addr!r} is not host:port, e.g. {DEFAULT_ADDR}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    # Looked up per request so a test's reset() is what gets served.
    return make_wsgi_app(REGISTRY)(environ, start_response)


def serve(addr: str = DEFAULT_ADDR) -> WSGIServer:
    """Serve /metrics on "host:port" in a daemon thread; stop with .shutdown(); .server_close()."""
    host, port = parse_addr(addr)
    server_class = _ThreadingWSGIServer
    if ":" in host:
        import socket

        class _V6(_ThreadingWSGIServer):
            address_family = socket.AF_INET6
        server_class = _V6
    server = make_server(host, port, _app, server_class=server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="svmotion-metrics", daemon=True)
    thread.start()
    log.info("metrics: serving http://%s:%d/metrics", host, server.server_port)
    return server
