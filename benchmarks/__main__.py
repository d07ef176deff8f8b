"""`python -m benchmarks --out bench`: run the cases, print the table, write results.json and SUMMARY.md.

Design notes
- `--quick` runs every case with tiny disks and one repetition: the smoke test
  (tests/bench/) uses it so the harness cannot rot; its figures mean nothing.
- `--cases 1,5` runs a subset (case 4 comes with case 3: one run measures both). The remote
  cases of issue 11 (cases_remote.py) have names: remote_bulk, remote_switchover,
  remote_strategies, qemu_tls_anchor, remote_shaped (network namespaces: needs root); the
  async mirror's of issue 12 (cases_async.py): async_slow_dest, async_quarter.
- Work files live in a fresh directory under --workdir (default /var/tmp, a real disk, not
  tmpfs) and are removed at the end; every server is stopped by its PID.
- SUMMARY.md holds only this run's figures and a reading generated from them (report.py);
  benchmarks/ANALYSIS.md, the hand-written analysis of earlier runs, is not embedded.
- A case that fails is recorded with its error and the run goes on: a partial table is
  more useful than none. The exit status is 1 when any case failed, 0 otherwise (a missed
  target is a result, not a failure).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback

from . import report
from .cases import CASES as LOCAL_CASES, FULL, QUICK, Context
from .cases_async import CASES as ASYNC_CASES
from .cases_remote import CASES as REMOTE_CASES
from .report import Case

CASES = {**LOCAL_CASES, **ASYNC_CASES, **REMOTE_CASES}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks",
                                 description="svmotion benchmarks against nbdkit's file plugin, "
                                             "nbdcopy, cp and QEMU's block mirror")
    ap.add_argument("--out", default="bench", help="directory for results.json and SUMMARY.md")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (smoke test)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case ids "
                    f"(default all: {','.join(CASES)}; 3 also measures 4)")
    ap.add_argument("--workdir", default="/var/tmp", help="parent directory for work files")
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: rewrite OUT/SUMMARY.md from OUT/results.json")
    args = ap.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        ap.error(f"unknown case {','.join(unknown)!r}; known cases: {','.join(CASES)} (4 runs with 3)")
    return args


def run_case(case_id: str, ctx: Context) -> list[Case]:
    start = time.monotonic()
    try:
        produced = CASES[case_id](ctx)
        cases = list(produced) if isinstance(produced, tuple) else [produced]
    except Exception as err:  # a failed case is reported, the others still run
        traceback.print_exc()
        title = CASES[case_id].__name__.removeprefix("case_").replace("_", " ")
        cases = [Case(case_id, title, "", error=f"{type(err).__name__}: {err}")]
    for case in cases:
        case.seconds = (time.monotonic() - start) / len(cases)
    return cases


def write_summary(out: str, cases: list[Case], meta: dict) -> None:
    with open(os.path.join(out, "SUMMARY.md"), "w") as f:
        f.write(report.markdown(cases, meta))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        cases, meta = report.read_json(os.path.join(args.out, "results.json"))
        write_summary(args.out, cases, meta)
        print(f"rewrote {args.out}/SUMMARY.md from {args.out}/results.json")
        return 0
    cfg = QUICK if args.quick else FULL
    os.makedirs(args.out, exist_ok=True)
    root = tempfile.mkdtemp(prefix="svmotion-bench-", dir=args.workdir)
    env = report.environment()
    started = time.monotonic()
    cases: list[Case] = []
    try:
        ctx = Context(root, cfg)
        for case_id in args.cases.split(","):
            print(f"-- case {case_id} ...", flush=True)
            done = run_case(case_id, ctx)
            cases.extend(done)
            print(report.table(done), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cmd = "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = {"command": cmd, "mode": cfg.name, "seconds": time.monotonic() - started, "env": env}
    report.write_json(os.path.join(args.out, "results.json"), cases, meta)
    write_summary(args.out, cases, meta)
    print("=" * 100)
    print(report.table(cases))
    print(f"wrote {args.out}/results.json and {args.out}/SUMMARY.md in {meta['seconds']:.0f} s")
    return 1 if any(c.error for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
