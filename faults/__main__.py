"""`python -m faults` (what `make faults` runs): the randomized fault campaign of issue 10.

Examples:
    python -m faults                         # 100 trials, a random seed (printed)
    python -m faults --trials 20 --seed 7    # 20 trials of campaign 7
    python -m faults --seed 7 --only 13      # trial 13 of campaign 7 again
    python -m faults --trial-seed 123456     # the trial of that seed (as printed for every trial)
    python -m faults --fault dest_eio,dest_full --trials 10
    python -m faults --self-test             # prove that the verifiers catch a lost write
    python -m faults --render --out DIR      # rewrite DIR/SUMMARY.md from DIR/results.jsonl

Design notes
- Trial k of campaign S has seed `trial_seed(S, k)`; a trial is fully described by its seed and
  the fault kinds it was drawn from (params.py), so `--trial-seed` repeats any trial by itself.
- Outputs go to --out (default `faults-results/`): results.jsonl, SUMMARY.md, and logs/ with the
  agent's, nbdkit's and the CLI's logs of every failing trial. Work files go to a fresh directory
  under --workdir (default /var/tmp) and are removed trial by trial.
- Exit status: 0 when every trial held every invariant, 1 when any trial violated one (or the
  harness could not finish it, or left something behind), 2 for a usage error. SIGTERM is
  handled like Ctrl-C: the running trial is cleaned up, the summary of the trials done is written.
"""
from __future__ import annotations

import argparse
import logging
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from faults import report
from faults.params import KINDS
from faults.trial import TrialResult, run_trial


def trial_seed(campaign: int, k: int) -> int:
    """The seed of trial k (1-based) of campaign `campaign`."""
    return random.Random(f"svmotion-faults:{campaign}:{k}").randrange(1, 2**31)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m faults", description="svmotion's randomized fault campaign")
    ap.add_argument("--trials", type=int, default=100, help="number of trials (default 100)")
    ap.add_argument("--seed", type=int, help="campaign seed (default: random, printed)")
    ap.add_argument("--only", type=int, metavar="K", help="run only trial K of the campaign (needs --seed)")
    ap.add_argument("--trial-seed", type=int, metavar="X", help="run the single trial of seed X")
    ap.add_argument("--fault", default=",".join(KINDS),
                    help=f"comma-separated fault kinds to draw from (default all: {','.join(KINDS)})")
    ap.add_argument("--out", type=Path, default=Path("faults-results"), help="results directory")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="parent of the work files")
    ap.add_argument("--self-test", action="store_true", help="prove the verifiers catch a lost write, then exit")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT/SUMMARY.md from OUT/results.jsonl")
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.fault.split(",") if k)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        ap.error(f"--fault {args.fault!r}: unknown kind {bad}; use some of {','.join(KINDS)}")
    if args.only is not None and args.seed is None:
        ap.error("--only K repeats trial K of a campaign: give that campaign's --seed too")
    if args.trials < 1:
        ap.error(f"--trials {args.trials}: give at least 1")
    args.kinds = kinds
    return args


def plan(args: argparse.Namespace) -> list[tuple[int | None, int]]:
    """(trial index, seed) of every trial to run."""
    if args.trial_seed is not None:
        return [(None, args.trial_seed)]
    if args.only is not None:
        return [(args.only, trial_seed(args.seed, args.only))]
    return [(k, trial_seed(args.seed, k)) for k in range(1, args.trials + 1)]


def command(args: argparse.Namespace) -> list[str]:
    """The options that repeat this run."""
    if args.trial_seed is not None:
        out = ["--trial-seed", str(args.trial_seed)]
    elif args.only is not None:
        out = ["--seed", str(args.seed), "--only", str(args.only)]
    else:
        out = ["--trials", str(args.trials), "--seed", str(args.seed)]
    return out + ([] if set(args.kinds) == set(KINDS) else ["--fault", ",".join(args.kinds)])


def line(r: TrialResult, n: int) -> str:
    f = r.fault or {}
    drawn = r.params["fault"]
    what = f"{drawn['kind']} at {drawn['moment']} (seen {f.get('phase_seen')}, {f.get('at_s')} s)"
    name = f"trial {r.index}/{n} seed {r.seed}" if r.index is not None else f"trial seed {r.seed}"
    if r.not_applicable:
        return f"{name}: not applicable: {r.not_applicable}"
    end = "ok" if not r.failed else (f"VIOLATED {', '.join(r.violations)}" if r.violations else "") + \
        (f" HARNESS ERROR {r.harness_error.splitlines()[0]}" if r.harness_error else "") + \
        (f" LEFT BEHIND {r.cleanup[:2]}" if r.cleanup else "")
    return (f"{name}: {what}: {(r.outcome or {}).get('state')}; {end} "
            f"({r.timing.get('trial_s')} s)")


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM: unwind like Ctrl-C, so that the running trial cleans up."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    if args.render:
        records = report.load(args.out / "results.jsonl")
        (args.out / "SUMMARY.md").write_text(report.summary(records, "# Fault campaign (re-rendered)"))
        return 0
    if args.self_test:
        from faults.selftest import self_test
        return self_test(args.workdir)
    if args.seed is None:
        args.seed = random.randrange(1, 2**31)
    signal.signal(signal.SIGTERM, interrupt)
    trials = plan(args)
    print(f"fault campaign: seed {args.seed}, {len(trials)} trials, faults {','.join(args.kinds)}; "
          f"results in {args.out}/ (repeat: python -m faults {' '.join(command(args))})", flush=True)
    results = report.ResultsFile(args.out / "results.jsonl")
    workroot = Path(tempfile.mkdtemp(prefix="svm-faults-", dir=args.workdir))
    started, done, records = time.monotonic(), 0, []
    try:
        for index, seed in trials:
            r = run_trial(seed, args.kinds, workroot, args.out / "logs", index)
            records.append(r.to_dict())
            results.append(records[-1])
            done += 1
            print(line(r, len(trials)), flush=True)
    except KeyboardInterrupt:
        print(f"interrupted after {done} trials; the running one was cleaned up", file=sys.stderr)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
        header = (f"# Fault campaign\n\n{done} of {len(trials)} trials, faults {', '.join(args.kinds)}, "
                  f"{time.monotonic() - started:.0f} s: `python -m faults {' '.join(command(args))}`.")
        (args.out / "SUMMARY.md").write_text(report.summary(records, header))
        print(f"summary: {args.out / 'SUMMARY.md'}", flush=True)
    return 1 if any(r["violations"] or r["harness_error"] or r["cleanup"] for r in records) or done < len(trials) else 0


if __name__ == "__main__":
    sys.exit(main())
