"""What `svmotion migrate` shows while it waits: a progress bar on a terminal, plain lines otherwise.

Design notes
- Input is the migration record the agent returns (`progress`, `phase`, `state`), polled by the
  CLI; nothing here talks to the agent, so the rendering is testable on its own.
- On a terminal one line is redrawn in place (`\\r`, cleared to the end); when stderr is a pipe
  or a file (CI logs, `| tee`) a plain line is written on every phase change and every few
  seconds, so logs stay readable and short.
- Progress goes to stderr: stdout is reserved for the result (and `--json`).
- While the copy phases run, the line shows the guest throttle (when one is applied) and the
  predicted time to converge and to finish (agent/convergence.py), or "—" when it cannot be
  predicted (what remains does not shrink). A stalled migration gets one line of its own, once
  per stall, naming the operator's choices; the bar goes on below it.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from agent.phases import PHASES
from agent.plan import human_bytes
from agent.report import change_line, throttle_summary
from agent.verify import verify_line

BAR_WIDTH = 28
PLAIN_INTERVAL_S = 2.0


def render_line(record: dict[str, Any], tty: bool) -> str:
    """One line: [bar] percent-on-destination, bytes copied of the disks' size, rate, dirty, phase."""
    p = record.get("progress") or {}
    copied, total = int(p.get("copied_bytes") or 0), int(p.get("total_bytes") or 0)
    dirty = int(p.get("dirty_bytes") or 0)
    fraction = done_fraction(record.get("phase", "Null"), total, dirty, p.get("mirroring", True))
    rate = float(p.get("rate_bps") or 0)
    text = (f"{fraction * 100:5.1f}% {human_bytes(copied)}/{human_bytes(total)} "
            f"{human_bytes(rate)}/s dirty {human_bytes(dirty)}{convergence_text(record)}  "
            f"{record.get('phase', '?')}")
    if not tty:
        return f"{record.get('vm', '?')}: {text}"
    filled = int(fraction * BAR_WIDTH)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {text}"


def convergence_text(record: dict[str, Any]) -> str:
    """' throttle 1.6 ms, converge in 12s, finish in 14s' while governed; '' before the copy phases."""
    view = record.get("convergence") or {}
    if view.get("remaining_bytes") is None or record.get("state", "running") != "running":
        return ""
    throttle = float(view.get("throttle_seconds") or 0)
    text = f" throttle {throttle * 1000:.1f} ms," if throttle else ""
    return (f"{text} converge in {eta(view.get('predicted_converge_seconds'))}, finish in "
            f"{eta(view.get('predicted_finish_seconds'))}")


def eta(seconds: float | None) -> str:
    """A predicted duration: 42s, 3m05s, 1h02m; "—" when unknown."""
    if seconds is None:
        return "—"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def done_fraction(phase: str, total: int, dirty: int, mirroring: bool = True) -> float:
    """How much of the disks the destination has: holes count as done once the copier passed them."""
    if phase not in PHASES or not total:
        return 0.0
    if PHASES.index(phase) >= PHASES.index("DiskCopyDone"):
        return 1.0
    if PHASES.index(phase) < PHASES.index("DiskCopy") or not mirroring:
        return 0.0
    return max(0.0, min(1.0, 1 - dirty / total))


class Progress:
    """Feed it migration records; it draws. Example: `p = Progress(); p.update(rec); p.close()`."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._last_phase: str | None = None
        self._last_plain = 0.0
        self._drawn = False
        self._stall_shown = False

    def update(self, record: dict[str, Any]) -> None:
        self._say_stall(record)
        line = render_line(record, self.tty)
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self._drawn = True
        else:
            now = time.monotonic()
            if record.get("phase") != self._last_phase or now - self._last_plain >= PLAIN_INTERVAL_S:
                self.stream.write(line + "\n")
                self._last_plain = now
        self._last_phase = record.get("phase")
        self.stream.flush()

    def _say_stall(self, record: dict[str, Any]) -> None:
        """One line when the migration stalls (agent/phases.py `stall`), again only after it recovered."""
        stall = (record.get("convergence") or {}).get("stall")
        if stall and not self._stall_shown:
            if self.tty and self._drawn:
                self.stream.write("\r\x1b[K")
            self.stream.write(f"svmotion: warning: {record.get('vm', '?')}: {stall}\n")
        self._stall_shown = bool(stall)

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def phase_table(record: dict[str, Any]) -> str:
    """The phases with their durations, then the stuns: what `migrate` and the demo print at the end."""
    lines = [f"{'phase':<14} {'seconds':>9}"]
    for phase in record.get("phases", []):
        lines.append(f"{phase['name']:<14} {phase['seconds']:>9.3f}")
    for stun in record.get("stuns", []):
        lines.append(f"stun {stun.get('kind', '?'):<15} {stun.get('duration_seconds', 0) * 1000:8.2f} ms "
                     f"(guest max wait {stun.get('max_wait_seconds', 0) * 1000:.2f} ms, "
                     f"{stun.get('held_requests', 0)} held requests, {stun.get('outcome', '?')})")
    passes = [p for p in record.get("passes", []) if p.get("kind") == "dirty"]
    dirty_passes = sum(p.get("count", 1) for p in passes)
    bulk = sum(p["bytes"] for p in record.get("passes", []) if p.get("kind") == "bulk")
    loads = [p for p in record.get("passes", []) if p.get("kind") == "load"]
    first = (f"{human_bytes(sum(p['bytes'] for p in loads))} load (of "
             f"{human_bytes(sum(p.get('compared_bytes', 0) for p in loads))} compared)" if loads
             else f"{human_bytes(bulk)} bulk")
    lines.append(f"copied {first}, {human_bytes(sum(p['bytes'] for p in passes))} in {dirty_passes} dirty passes")
    lines += [f"set {change_line(c)}" for c in record.get("changes") or []]
    throttle = throttle_summary(record)
    if throttle:
        lines.append(throttle)
    if record.get("verify"):
        lines.append(verify_line(record["verify"]))
    return "\n".join(lines)



def outcome_line(record: dict[str, Any]) -> str:
    """One line saying how the migration ended and where the VM runs now."""
    vm, state = record.get("vm", "?"), record.get("state", "?")
    if (record.get("verify") or {}).get("result") not in (None, "match"):
        return f"{vm}: migration {state}: {record.get('error')}"   # the error says where the VM runs
    if state == "success":
        dests = ", ".join(d["dest"] for d in record.get("disks", []))
        return f"{vm}: migrated; its disks are now {dests}"
    if state == "running":
        return f"{vm}: migration {record.get('id')} running, phase {record.get('phase')}"
    return f"{vm}: migration {state}: {record.get('error')}; the VM runs on its intact source"
