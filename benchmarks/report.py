"""Case results, the console table, bench/results.json and bench/SUMMARY.md.

Design notes
- A case is a list of measured rows (label, summary of samples, unit) plus the commands that
  produced them, the ratios the issue asks for, and its target with a verdict. Verdicts are
  computed from the measured numbers by the case, never typed in: `met` is True, False, or
  None when the case could not measure (the reason is then in `error`).
- Units: rows hold SI base units (seconds, bytes, bytes/s); the table scales them for reading
  (ms, MiB, MB/s) and the JSON keeps the raw numbers.
- SUMMARY.md states only figures of its own run: its reading ("Reading this run") is generated
  from that run's verdicts and notes. Analysis written by hand (benchmarks/ANALYSIS.md) names
  the run it analyses and is not embedded: a new run printed under an old analysis would
  contradict its own table.
"""
from __future__ import annotations

import json
import math
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .stats import summarize


MAX_KEPT_SAMPLES = 200  # rows of per-request latencies keep only their summary


@dataclass
class Row:
    label: str
    summary: dict[str, float]
    unit: str  # s, B, B/s, ratio, iops, %
    samples: list[float] | None = None

    @classmethod
    def of(cls, label: str, samples: list[float], unit: str) -> "Row":
        kept = list(samples) if len(samples) <= MAX_KEPT_SAMPLES else None
        return cls(label, summarize(samples), unit, kept)


@dataclass
class Case:
    id: str
    title: str
    target: str
    rows: list[Row] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def add(self, label: str, samples: list[float], unit: str) -> Row:
        row = Row.of(label, samples, unit)
        self.rows.append(row)
        return row

    def command(self, text: str) -> None:
        if text not in self.commands:
            self.commands.append(text)

    def verdict(self, what: str, value: float, limit: float, better: str, unit: str) -> bool | None:
        """Record `what` = value against a target limit; better is 'lower' or 'higher'."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            met = None
        else:
            met = value <= limit if better == "lower" else value >= limit
        self.verdicts.append({"what": what, "value": value, "limit": limit, "better": better,
                              "unit": unit, "met": met})
        return met

    @property
    def met(self) -> bool | None:
        results = [v["met"] for v in self.verdicts]
        if self.error or not results or any(r is None for r in results):
            return None
        return all(results)


def fmt(value: float, unit: str) -> str:
    """A number scaled for reading: seconds as ms, bytes as MiB, rates as MB/s."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "s":
        return f"{value * 1e3:.2f} ms" if value < 10 else f"{value:.1f} s"
    if unit == "B":
        return f"{value / 2**20:.2f} MiB" if value < 2**30 else f"{value / 2**30:.2f} GiB"
    if unit == "B/s":
        return f"{value / 1e6:.1f} MB/s"
    if unit == "ratio":
        return f"{value:.3f}x"
    if unit == "iops":
        return f"{value:,.0f} IOPS"
    if unit == "%":
        return f"{value * 100:.1f}%"
    return f"{value:.4g}"


def measured_text(v: dict[str, Any]) -> str:
    """A verdict's measure, value and target, e.g. 'x / y (medians) = 0.720x (target >= 0.800x)'."""
    sign = "<=" if v["better"] == "lower" else ">="
    return f"{v['what']} = {fmt(v['value'], v['unit'])} (target {sign} {fmt(v['limit'], v['unit'])})"


def verdict_text(v: dict[str, Any]) -> str:
    mark = {True: "MET", False: "MISSED", None: "not measured"}[v["met"]]
    return f"{mark}: {measured_text(v)}"


def table(cases: list[Case]) -> str:
    """The console table: one line per row, verdicts under each case."""
    lines = []
    head = f"{'':4}{'measure':62} {'median':>14} {'p99':>14} {'max':>14} {'n':>6}"
    for case in cases:
        lines.append(f"== case {case.id}: {case.title}  ({case.seconds:.0f} s)")
        if case.error:
            lines.append(f"    ERROR: {case.error}")
        lines.append(head)
        for row in case.rows:
            s = row.summary
            lines.append(f"    {row.label[:62]:62} {fmt(s['median'], row.unit):>14} "
                         f"{fmt(s['p99'], row.unit):>14} {fmt(s['max'], row.unit):>14} {s['n']:>6}")
        for v in case.verdicts:
            lines.append(f"    -> {verdict_text(v)}")
        lines.append("")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unavailable"

    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "kernel": platform.release(),
        "cpus": __import__("os").cpu_count(),
        "loadavg_at_start": load,
        "nbdkit": version(["nbdkit", "--version"]),
        "qemu-storage-daemon": version(["qemu-storage-daemon", "--version"]),
        "fio": version(["fio", "--version"]),
        "nbdcopy": version(["nbdcopy", "--version"]),
        "python": platform.python_version(),
    }


def write_json(path: str, cases: list[Case], meta: dict[str, Any]) -> None:
    def clean(obj: Any) -> Any:  # JSON has no NaN: write null
        if isinstance(obj, float) and math.isnan(obj):
            return None
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return obj

    with open(path, "w") as f:
        json.dump(clean({"meta": meta, "cases": [asdict(c) for c in cases]}), f, indent=1)


def read_json(path: str) -> tuple[list[Case], dict[str, Any]]:
    """Cases and meta back from a results.json (to re-render SUMMARY.md without re-measuring)."""
    def restore(obj: Any) -> Any:  # null back to NaN where a number was missing
        if obj is None:
            return math.nan
        if isinstance(obj, dict):
            return {k: restore(v) for k, v in obj.items()}
        return obj

    with open(path) as f:
        data = json.load(f)
    cases = []
    for c in data["cases"]:
        rows = [Row(r["label"], restore(r["summary"]), r["unit"], r.get("samples"))
                for r in c.pop("rows")]
        cases.append(Case(**c, rows=rows))
    return cases, data["meta"]


def reading(cases: list[Case], mode: str) -> list[str]:
    """"Reading this run": every verdict of this run, met or missed or not measured, each with
    its measured value and its case, then where the case's references in the same run are."""
    groups: dict[bool | None, list[str]] = {True: [], False: [], None: []}
    for case in cases:
        if case.error and not case.verdicts:
            groups[None].append(f"case {case.id} ({case.title}): {case.error}")
        for v in case.verdicts:
            groups[v["met"]].append(f"case {case.id}: {measured_text(v)}")
    out = ["## Reading this run", "",
           "Generated from this run's own figures. Each case's section below holds the references "
           "it measured beside svmotion in this run (nbdkit's C plugin, the minimal Python plugin, "
           "nbdcopy, QEMU, the floors) and its notes; hand-written analysis of earlier runs, each "
           "naming its run, is in `benchmarks/ANALYSIS.md`.", ""]
    if mode != "full":
        out += [f"Mode `{mode}`: tiny disks and one repetition, a smoke test of the harness; its "
                "figures and verdicts say nothing about svmotion.", ""]
    for met, head in ((True, "Met"), (False, "Missed"), (None, "Not measured")):
        if groups[met]:
            out.append(f"{head} ({len(groups[met])}):")
            out.append("")
            out.extend(f"- {line}" for line in groups[met])
            out.append("")
    return out


def markdown(cases: list[Case], meta: dict[str, Any]) -> str:
    """bench/SUMMARY.md: verdicts first, then every case's rows and commands."""
    out = ["# svmotion benchmark summary", ""]
    made_by = " (what `make bench` runs)" if meta["command"] == "python -m benchmarks --out bench" else ""
    out.append(f"Command: `{meta['command']}`{made_by} — run {meta['env']['date']}, {meta['seconds']:.0f} s "
               f"on {meta['env']['cpus']} CPUs (load average at start "
               f"{' '.join(meta['env']['loadavg_at_start'])}), mode `{meta['mode']}`.")
    out.append("")
    out.append("Versions: " + ", ".join(f"{k} `{v}`" for k, v in meta["env"].items()
                                        if k not in ("date", "cpus", "loadavg_at_start")) + ".")
    out.append("")
    out.append("All ratios are measured side by side in this one run. Latencies are from each "
               "request's scheduled send time (open-loop writer, `benchmarks/loadgen.py`).")
    out.append("")
    out.append("## Targets")
    out.append("")
    out.append("| case | target | result |")
    out.append("| --- | --- | --- |")
    for case in cases:
        results = "<br>".join(verdict_text(v) for v in case.verdicts) or (
            f"ERROR: {case.error}" if case.error else "reported, no target")
        out.append(f"| {case.id}. {case.title} | {case.target} | {results} |")
    out.append("")
    out.extend(reading(cases, meta["mode"]))
    for case in cases:
        out.append(f"## {case.id}. {case.title}")
        out.append("")
        if case.error:
            out.append(f"**Error:** {case.error}")
            out.append("")
        out.append("| measure | median | p99 | max | n |")
        out.append("| --- | ---: | ---: | ---: | ---: |")
        for row in case.rows:
            s = row.summary
            out.append(f"| {row.label} | {fmt(s['median'], row.unit)} | {fmt(s['p99'], row.unit)} "
                       f"| {fmt(s['max'], row.unit)} | {s['n']} |")
        out.append("")
        for note in case.notes:
            out.append(f"- {note}")
        if case.notes:
            out.append("")
        if case.commands:
            out.append("Commands:")
            out.append("")
            out.append("```")
            out.extend(case.commands)
            out.append("```")
            out.append("")
    return "\n".join(out)
