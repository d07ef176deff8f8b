"""The fault campaign's fixed-seed sample (what `make test` runs of `make faults`), and its self-test.

Each sample trial is one seed of `python -m faults`, drawn from one fault kind, chosen so that the
sample covers every kind and several moments: the agent killed in the bulk copy and after the
switchover, nbdkit killed in the dirty passes, the destination failing writes and filling up, the
agent hung under the mirror-install stun. A trial must hold every invariant (faults/checks.py)
and leave nothing behind; a failure prints the trial's violations, evidence and the command that
repeats it. The self-test proves that the campaign's verifiers catch a lost write at all.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from faults import selftest
from faults.trial import run_trial

pytestmark = pytest.mark.slow

# (fault kind, trial seed): what each draws is in the test id; see faults/params.py.
SAMPLE = [
    ("agent_kill", 20),       # DiskCopy, 3 disks, optimized, sync mirror, --rate
    ("agent_kill", 7),        # DiskCopyDone: after the switchover, before the rename
    ("nbdkit_kill", 33),      # CopyDirtyData, 2 disks, legacy, dirty mirror
    ("dest_eio", 26),         # DiskCopy, 2 disks, optimized, sync mirror, --rate
    ("dest_full", 32),        # CopyDirtyData, 2 disks, legacy, sync mirror
    ("hung_stun", 19),        # 1 disk, optimized, dirty mirror, --rate
]


def test_the_verifiers_catch_a_lost_write(tmp_path: Path) -> None:
    shown = selftest.run(tmp_path)
    assert any("fio caught" in line for line in shown) and any("writer caught" in line for line in shown), shown


@pytest.mark.parametrize("kind,seed", SAMPLE, ids=[f"{k}-{s}" for k, s in SAMPLE])
def test_sample_trial_holds_every_invariant(tmp_path: Path, kind: str, seed: int) -> None:
    result = run_trial(seed, (kind,), tmp_path, tmp_path / "logs")
    if result.not_applicable:
        pytest.skip(result.not_applicable)
    assert result.fault.get("fired") or result.fault.get("missed"), f"the fault never fired: {result.fault}"
    problems = {name: result.invariants[name]["detail"] for name in result.violations}
    assert not problems and not result.harness_error and not result.cleanup, (
        f"repeat with `{result.repro}`\nfault: {result.fault}\noutcome: {result.outcome}\n"
        f"violations: {problems}\nharness error: {result.harness_error}\nleft behind: {result.cleanup}\n"
        + "".join(f"--- {name} (tail)\n{text[-1500:]}\n" for name, text in result.logs.items()))
