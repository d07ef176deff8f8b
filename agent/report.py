"""A migration report for people without Grafana: the record of `svmotion migrate --report`
turned into a PNG (convergence curve and throughput over time) and a short text summary.

Design notes
- Input: the migration record the agent keeps (agent/phases.py `Migration.to_dict()`), written
  by `svmotion migrate --report FILE.json`; a reply wrapping it as {"migration": {...}} is
  accepted too. What this module reads of it (everything else is ignored):

      {vm, state, error, options: {strategy, mirror, ...},
       passes:  [{kind (bulk, load, dirty), bytes, compared_bytes (load)}],
       verify:  null or {result, first_mismatch, verified_bytes, skipped_bytes, ...},
       changes: [{t, phase, what, from, to, applied}]          # `svmotion set` (optional)
       convergence: {throttle_events: [{throttle_seconds, reason, ...}], ...}   # (optional)
       phases:  [{name, started (unix s), seconds}],
       stuns:   [{kind, started (unix s), duration_seconds, max_wait_seconds, ...}],
       started (unix s),
       samples: [{t (s since sampling began), phase, dirty_bytes,
                  copied_bytes, guest_written_bytes}]}     # sums over the VM's disks

  `samples` is the timeline (one every 0.25 s); the byte counts are cumulative except
  dirty_bytes, so throughput is the difference of two samples over their time step.
- Matplotlib with the Agg backend: no display, no GUI toolkit; imported only when a PNG is
  drawn, so the agent and the rest of the CLI never pay for it.
- A bad file gets one line naming the file and what is missing (ReportError); the CLI turns it
  into a usage error (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.plan import human_bytes
from agent.verify import verify_line

SAMPLE_KEYS = ("t", "phase", "dirty_bytes", "copied_bytes", "guest_written_bytes")
MIB = float(1 << 20)


class ReportError(ValueError):
    """The report file cannot be used; the message names the file and the problem."""


def load_record(path: str | Path) -> dict[str, Any]:
    """Read and check a migration record; raise ReportError with one clear line."""
    try:
        record = json.loads(Path(path).read_text())
    except OSError as err:
        raise ReportError(f"cannot read report {str(path)!r}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ReportError(f"report {str(path)!r} is not JSON ({err.msg} at line {err.lineno}); "
                          f"write it with `svmotion migrate --report FILE.json`") from None
    if isinstance(record, dict) and isinstance(record.get("migration"), dict):
        record = record["migration"]
    if not isinstance(record, dict) or not isinstance(record.get("samples"), list):
        raise ReportError(f"report {str(path)!r} has no 'samples' list; write it with "
                          f"`svmotion migrate --report FILE.json`")
    for i, sample in enumerate(record["samples"]):
        missing = [k for k in SAMPLE_KEYS if not isinstance(sample, dict) or k not in sample]
        if missing:
            raise ReportError(f"report {str(path)!r}: sample {i} lacks {', '.join(missing)}")
    if len(record["samples"]) < 2:
        raise ReportError(f"report {str(path)!r} has {len(record['samples'])} sample(s); a plot "
                          f"needs at least 2 (the migration ended before the first 0.25 s?)")
    return record


def rates(samples: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Bytes/s of a cumulative counter between consecutive samples, at each step's midpoint."""
    times, values = [], []
    for a, b in zip(samples, samples[1:]):
        dt = float(b["t"]) - float(a["t"])
        if dt > 0:
            times.append((float(a["t"]) + float(b["t"])) / 2)
            values.append(max(0.0, float(b[key]) - float(a[key])) / dt)
    return times, values


def phase_spans(samples: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(phase, start t, end t) for each run of consecutive samples in the same phase."""
    spans: list[tuple[str, float, float]] = []
    for sample in samples:
        t, phase = float(sample["t"]), str(sample["phase"])
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], t)
        else:
            if spans:
                spans[-1] = (spans[-1][0], spans[-1][1], t)
            spans.append((phase, t, t))
    return spans


def stun_times(record: dict[str, Any]) -> list[tuple[float | None, str, float, float]]:
    """(t on the sample clock or None, kind, duration s, guest max wait s) of each stun."""
    origin = _sample_origin(record)
    out = []
    for stun in record.get("stuns") or []:
        started = stun.get("started")
        t = float(started) - origin if origin is not None and started is not None else None
        out.append((t, str(stun.get("kind", "?")), float(stun.get("duration_seconds") or 0.0),
                    float(stun.get("max_wait_seconds") or 0.0)))
    return out


def _sample_origin(record: dict[str, Any]) -> float | None:
    # Samples count from the sampler's start, stuns carry wall time; the sampler starts as the
    # migration connects, so the migration's own start is the origin to within a few ms.
    started = record.get("started")
    return float(started) if isinstance(started, (int, float)) else None


def summary(record: dict[str, Any]) -> str:
    """A few lines: outcome, phase times, stun times, bytes copied."""
    options = record.get("options") or {}
    lines = [f"VM {record.get('vm', '?')}: {record.get('state', '?')}"
             f"{' (' + record['error'] + ')' if record.get('error') else ''}, "
             f"strategy {options.get('strategy', '?')}, mirror {options.get('mirror', '?')}"]
    for phase in record.get("phases") or []:
        lines.append(f"  {phase.get('name', '?'):<14} {float(phase.get('seconds', 0)):9.3f} s")
    for _, kind, duration, wait in stun_times(record):
        lines.append(f"  stun {kind:<15} {duration * 1000:8.2f} ms (guest max wait {wait * 1000:.2f} ms)")
    for p in record.get("passes") or []:
        if p.get("kind") == "load":
            lines.append(f"  load pass: {float(p.get('compared_bytes') or 0) / MIB:.1f} MiB compared, "
                         f"{float(p.get('bytes') or 0) / MIB:.1f} MiB copied (resumed partial disks)")
    lines += [f"  set {change_line(c)}" for c in record.get("changes") or []]
    throttle = throttle_summary(record)
    if throttle:
        lines.append(f"  {throttle}")
    if record.get("verify"):
        lines.append(f"  {verify_line(record['verify'])}")
    last = record["samples"][-1]
    lines.append(f"  copied {float(last['copied_bytes']) / MIB:.1f} MiB, guest wrote "
                 f"{float(last['guest_written_bytes']) / MIB:.1f} MiB, "
                 f"{len(record['samples'])} samples over {float(last['t']):.1f} s")
    return "\n".join(lines)


def change_line(change: dict[str, Any]) -> str:
    """One `svmotion set` change: what, from, to, when, how it was applied."""
    def shown(value: Any) -> str:
        if change["what"] == "rate":
            return f"{human_bytes(value)}/s" if value else "unlimited"
        if change["what"] in ("max_throttle", "stun_budget"):
            return f"{value * 1000:g} ms"
        return str(value)
    how = {"mirror node": "by the mirror node, no stun", "options": "before the mirror was installed",
           "agent": "by the agent"}.get(change.get("applied"), change.get("applied"))
    return (f"{change['what']} {shown(change['from'])} -> {shown(change['to'])} in {change.get('phase', '?')} "
            f"({how})")


def throttle_summary(record: dict[str, Any]) -> str:
    """How far the guest throttle went and how often the migration stalled ('' if neither happened)."""
    events = (record.get("convergence") or {}).get("throttle_events") or []
    stalls = sum(1 for e in events if e.get("reason") == "stalled")
    steps = len(events) - stalls
    if not events:
        return ""
    top = max(e["throttle_seconds"] for e in events)
    return (f"guest throttle: up to {top * 1000:.2f} ms per write, {steps} changes"
            f"{f', stalled {stalls} times' if stalls else ''}")


def render_png(record: dict[str, Any], out: str | Path) -> Path:
    """Draw the convergence curve and the throughput of a migration record into a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # no display: a file is all we make
    import matplotlib.pyplot as plt

    samples = record["samples"]
    t = [float(s["t"]) for s in samples]
    fig, (conv, thr) = plt.subplots(2, 1, figsize=(11, 7), sharex=True,
                                    gridspec_kw={"height_ratios": [3, 2]})
    try:
        _shade_phases(conv, samples)
        conv.plot(t, [float(s["dirty_bytes"]) / MIB for s in samples], color="tab:red",
                  linewidth=2, drawstyle="steps-post", label="dirty (not yet on destination)")
        conv.set_ylabel("dirty MiB")
        conv.set_ylim(bottom=0, top=max(float(s["dirty_bytes"]) for s in samples) / MIB * 1.15 or 1)
        # A stun falls just before the first sample (mirror_install) or just after the last
        # (switchover, which ends the sampling): draw any within a second of the timeline.
        for when, kind, duration, wait in stun_times(record):
            if when is not None and t[0] - 1.0 <= when <= t[-1] + 1.0:
                conv.axvline(when, color="black", linestyle="--", linewidth=1)
                conv.annotate(f"{kind} stun {duration * 1000:.1f} ms", (when, 0),
                              xytext=(3, 4), textcoords="offset points", rotation=90,
                              fontsize=8, va="bottom")
        conv.legend(loc="center right", fontsize=8)
        fig.suptitle(_title(record), fontsize=10)

        for key, label, color in (("copied_bytes", "copied", "tab:blue"),
                                  ("guest_written_bytes", "guest writes", "tab:green")):
            times, values = rates(samples, key)
            thr.plot(times, [v / MIB for v in values], label=label, color=color)
        thr.set_ylabel("MiB/s")
        thr.set_xlabel("seconds since the migration started")
        thr.set_ylim(bottom=0)
        thr.legend(loc="upper right", fontsize=8)
        thr.grid(alpha=0.3)
        fig.tight_layout()
        out = Path(out)
        fig.savefig(out, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out


def _shade_phases(ax: Any, samples: list[dict[str, Any]]) -> None:
    """Alternate bands per phase; name the phases wide enough to hold their name."""
    colors = ("#f2f2f2", "#e0ecf8")
    total = max(float(samples[-1]["t"]) - float(samples[0]["t"]), 1e-9)
    for i, (phase, start, end) in enumerate(phase_spans(samples)):
        if end > start:
            ax.axvspan(start, end, color=colors[i % 2], zorder=0)
            if (end - start) / total >= 0.07:
                ax.text((start + end) / 2, 0.98, phase, transform=ax.get_xaxis_transform(),
                        ha="center", va="top", fontsize=8, color="dimgray")


def _title(record: dict[str, Any]) -> str:
    options = record.get("options") or {}
    stuns = ", ".join(f"{kind} {d * 1000:.1f} ms" for _, kind, d, _ in stun_times(record))
    return (f"{record.get('vm', '?')}: {record.get('state', '?')} - strategy "
            f"{options.get('strategy', '?')}, mirror {options.get('mirror', '?')}"
            f"{' - stuns: ' + stuns if stuns else ''}")
