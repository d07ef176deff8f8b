"""What one trial does, drawn from its seed alone: the VM, the workload, the migration, the fault.

Design notes
- A trial is reproducible from `(seed, kinds)`: every random choice is drawn here, up front, from
  `random.Random(seed)`, in a fixed order. (The machine's timing is not reproducible: the same
  parameters may hit a slightly different instant; the results record what was actually hit.)
- `kinds` narrows the fault kinds drawn from (`--fault`); the kind is the first draw, so a seed
  run with one kind and with all kinds differs in everything. The results file records both.
- One fault per trial, at a *moment*: a phase of the migration (with a short SVMOTION_INJECT hold
  at the phase's start, so that even a millisecond phase is caught by polling, and a random delay
  from there, which may run past the hold into the phase's own work), or one of two instants of
  the switchover that no phase name marks: `switched` (the mirror node serves the destination,
  the agent has not yet finished) and `finished` (the mirror node's `finish` is done, the agent
  may not have recorded it yet: issue 10's defect 1).
- Destination faults (EIO, full) are drawn only at phases up to the switchover, and do not fire
  once it began: a destination that breaks after the migration committed (its last flush before
  the switchover stun) is the new storage failing under its workload, not a migration fault. A
  fault that races the commit anyway is recorded and the trial counted as not applicable.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.phases import PHASES

MiB = 1 << 20
KINDS = ("agent_kill", "nbdkit_kill", "dest_eio", "dest_full", "hung_stun")
# Listed in every summary, never drawn, with the reason.
NOT_APPLICABLE = {"dest_link_down": "no remote destinations exist yet: the destination is a local directory"}
KILL_MOMENTS = PHASES + ("switched", "finished")
DEST_MOMENTS = PHASES[PHASES.index("DiskSetup"):PHASES.index("CopyDirtyData") + 1]
LONG_PHASES = ("DiskCopy", "CopyDirtyData")
TIMING_HOLD_S = 0.3
LEASE_S = 2.0


@dataclass
class FioParams:
    """fio's part of the workload: the first half of every disk, written once, in rounds (fio.py)."""
    bs: int
    iodepth: int
    rate: int                 # bytes/s per disk, at most (fio.py lowers it so that the area lasts)
    fsync: int                # an NBD flush every N writes (0: none)
    round_s: float            # seconds of one round (fio.py)


@dataclass
class WriterParams:
    """The project's VerifyingWriter: the third quarter of every disk (A), then the fourth (B)."""
    connections: int
    queue_depth: int
    rate: int                 # bytes/s per disk
    zero_ratio: float
    trim_ratio: float
    seed: int


@dataclass
class FaultParams:
    kind: str
    moment: str               # a phase name, "switched" or "finished"
    hold: float               # SVMOTION_INJECT hold at the moment's phase, to catch it (0: none)
    delay: float              # seconds from the moment to the fault
    eio_rate: int = 0         # dest_eio: percent of the destination's writes that fail
    full_slack: int = 0       # dest_full: bytes left free when the destination is filled
    hang: float = 0.0         # hung_stun: seconds the agent sleeps holding the mirror-install stun


@dataclass
class TrialParams:
    seed: int
    kinds: tuple[str, ...]
    disk_sizes: list[int]
    layout: str               # dense | sparse
    strategy: str
    mirror: str
    rate: int                 # --rate (0: unlimited)
    granularity: int
    lease: float
    fio: FioParams
    writer: WriterParams
    fault: FaultParams
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def draw(seed: int, kinds: tuple[str, ...] = KINDS) -> TrialParams:
    """The trial of `seed`, its fault drawn from `kinds`."""
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"fault kinds {list(kinds)}: use some of {', '.join(KINDS)}")
    rng = random.Random(seed)
    kind = rng.choice(kinds)
    sizes = [rng.choice((8, 16, 24, 32)) * MiB for _ in range(rng.randint(1, 4))]
    total = sum(sizes)
    rate = 0
    if rng.random() < 0.5:
        # A bulk copy of 1.5 to 4 s: long enough to land faults inside it, short enough for 100 trials.
        rate = max(MiB, int(total / rng.uniform(1.5, 4.0)) // MiB * MiB)
    return TrialParams(
        seed=seed, kinds=tuple(kinds), disk_sizes=sizes,
        layout=rng.choice(("dense", "sparse")),
        strategy=rng.choice(("optimized", "legacy")),
        mirror=rng.choice(("sync", "dirty")),
        rate=rate,
        granularity=rng.choice((64 * 1024, 64 * 1024, 16 * 1024, 256 * 1024, MiB)),
        lease=LEASE_S,
        fio=FioParams(bs=rng.choice((4096, 8192, 16384)), iodepth=rng.randint(1, 8),
                      rate=rng.choice((512 * 1024, MiB, 2 * MiB)), fsync=rng.choice((0, 8, 32)),
                      round_s=rng.choice((0.5, 1.0))),
        writer=WriterParams(connections=rng.randint(1, 2), queue_depth=rng.randint(1, 4),
                            rate=rng.choice((512 * 1024, MiB, 2 * MiB)),
                            zero_ratio=rng.choice((0.0, 0.03)), trim_ratio=rng.choice((0.0, 0.02)),
                            seed=rng.randrange(2**31)),
        fault=draw_fault(rng, kind),
    )


def draw_fault(rng: random.Random, kind: str) -> FaultParams:
    if kind == "hung_stun":
        # The only phase entered holding a stun is Unstun (the mirror-install stun).
        return FaultParams(kind, "Unstun", hold=0.0, delay=0.0, hang=round(LEASE_S + rng.uniform(0.3, 2.0), 2))
    moment = rng.choice(DEST_MOMENTS if kind.startswith("dest_") else KILL_MOMENTS)
    hold, delay = moment_timing(rng, moment)
    fault = FaultParams(kind, moment, hold=hold, delay=delay)
    if kind == "dest_eio":
        fault.eio_rate = rng.choice((10, 50, 100))
    elif kind == "dest_full":
        fault.full_slack = rng.choice((0, 64 * 1024, 512 * 1024))
    return fault


def moment_timing(rng: random.Random, moment: str) -> tuple[float, float]:
    """(hold, delay) for a moment: see the module notes."""
    if moment == "finished":
        return 0.0, 0.0                  # the window before the agent records it is tiny
    if moment == "Cleanup":
        return 0.0, round(rng.uniform(0.0, 0.05), 3)    # SVMOTION_INJECT does not hold at Cleanup
    if moment == "switched":
        return TIMING_HOLD_S, round(rng.uniform(0.0, 0.25), 3)   # held at DiskCopyDone, switched
    extra = 1.0 if moment in LONG_PHASES else 0.05
    return TIMING_HOLD_S, round(rng.uniform(0.0, TIMING_HOLD_S + extra), 3)


def injection(fault: FaultParams) -> str | None:
    """The agent's SVMOTION_INJECT for this fault (None: nothing to inject)."""
    if fault.kind == "hung_stun":
        return f"hold:Unstun={fault.hang}"
    if not fault.hold:
        return None
    phase = "DiskCopyDone" if fault.moment == "switched" else fault.moment
    return f"hold:{phase}={fault.hold}"
