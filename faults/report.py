"""The campaign's outputs: `results.jsonl` (one line per trial, written as each ends) and
`SUMMARY.md` (counts per fault kind, every failing trial with the command that repeats it).

Design notes
- Results are appended and flushed trial by trial, so an interrupted campaign keeps what it did;
  the summary is rewritten from the results at the end (and `--render` rebuilds it from a file).
- Columns (per fault kind): trials; the faulted migration's outcome (succeeded / failed / aborted
  / no record); trials that lost acknowledged writes (and how many blocks); guest errors the
  destination caused (trials, and failed guest requests, at most 20 per disk and phase, each
  failed fio round counted once: unexpected guest errors in dest_* trials); other unexpected
  guest errors;
  workloads left on a damaged side (the served side lacks data, is split, is not the side the
  outcome names, or the agent records another); trials with any invariant violation; harness
  errors (a trial the harness could not run to the end: to fix in the harness or the product).
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from faults.checks import INVARIANTS
from faults.params import KINDS, NOT_APPLICABLE

DAMAGED_SIDE = ("acked_writes_kept", "one_intact_side", "agent_agrees_with_nbdkit")


class ResultsFile:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(records: list[dict[str, Any]], header: str) -> str:
    rows = defaultdict(Counter)
    for r in records:
        kind = r["params"]["fault"]["kind"]
        c = rows[kind]
        if r.get("not_applicable"):
            c["not_applicable"] += 1
            continue
        c["trials"] += 1
        state = (r.get("outcome") or {}).get("state")
        if state or not r.get("harness_error"):
            c[f"outcome_{state or 'none'}"] += 1
        if r.get("lost_blocks"):
            c["lost_trials"] += 1
            c["lost_blocks"] += r["lost_blocks"]
        c["dest_errors"] += r.get("dest_caused_guest_errors", 0)
        c["dest_error_trials"] += bool(r.get("dest_caused_guest_errors"))
        c["other_errors"] += r.get("other_guest_errors", 0)
        c["other_error_trials"] += bool(r.get("other_guest_errors"))
        violations = r.get("violations", [])
        c["damaged"] += any(v in DAMAGED_SIDE for v in violations)
        c["violating"] += bool(violations)
        c["harness"] += bool(r.get("harness_error") or r.get("cleanup"))
    lines = [header, "",
             "| fault | trials | succeeded | failed | aborted | no record | acked writes lost (trials / blocks) "
             "| guest errors caused by the destination (trials / requests) | other guest errors (trials / requests) "
             "| workloads left on a damaged side "
             "| trials with invariant violations | harness errors |",
             "| --- | " + " | ".join(["---:"] * 11) + " |"]
    total = Counter()
    for kind in KINDS:
        c = rows.get(kind, Counter())
        total.update(c)
        lines.append(row(kind, c))
    lines.append(row("**all**", total))
    for kind, why in NOT_APPLICABLE.items():
        lines.append(f"| {kind} | not applicable: {why} |" + " |" * 10)
    skipped = [(k, c["not_applicable"]) for k, c in rows.items() if c["not_applicable"]]
    if skipped:
        lines += ["", "Not run on this host: " + ", ".join(f"{k} x{n}" for k, n in skipped) +
                  " (see `not_applicable` in the results)."]
    lines += ["", "Invariant violations by invariant:", ""]
    by_invariant = Counter(v for r in records for v in r.get("violations", []))
    lines += [f"- `{name}`: {by_invariant[name]}" for name in INVARIANTS]
    lines += failing(records)
    return "\n".join(lines) + "\n"


def row(name: str, c: Counter) -> str:
    return (f"| {name} | {c['trials']} | {c['outcome_success']} | {c['outcome_failed']} | {c['outcome_aborted']} "
            f"| {c['outcome_none']} | {c['lost_trials']} / {c['lost_blocks']} "
            f"| {c['dest_error_trials']} / {c['dest_errors']} | {c['other_error_trials']} / {c['other_errors']} "
            f"| {c['damaged']} | {c['violating']} | {c['harness']} |")


def failing(records: Iterable[dict[str, Any]]) -> list[str]:
    out = []
    for r in records:
        if not (r.get("violations") or r.get("harness_error") or r.get("cleanup")):
            continue
        f = r.get("fault", {}) or {}
        what = f"{f.get('kind') or r['params']['fault']['kind']} at {f.get('moment')} (seen: {f.get('phase_seen')}, " \
               f"{f.get('at_s')} s)"
        out.append(f"- trial {r.get('index')} seed {r['seed']}: {what}; outcome "
                   f"{(r.get('outcome') or {}).get('state')}; violated {', '.join(r.get('violations', [])) or '-'}"
                   f"{'; harness error: ' + r['harness_error'].splitlines()[0] if r.get('harness_error') else ''}"
                   f"{'; cleanup: ' + '; '.join(r['cleanup'][:3]) if r.get('cleanup') else ''}  \n"
                   f"  repeat: `{r['repro']}`")
        for name in r.get("violations", []):
            out.append(f"  - `{name}`: {' '.join(r['invariants'][name]['detail'].split())[:600]}")
    return ["", "Failing trials:", ""] + out if out else ["", "No failing trial."]
