"""The invariants checked after every trial, each a named verdict with its evidence.

Design notes
- A check returns `Check(ok, detail)`: ok True (held), False (violated: a defect, or a harness
  bug to fix, never a result to drop) or None (not applicable to this trial, with the reason).
- What the VM runs on is what nbdkit serves: the mirror node's `hello` names the files. The
  agent's view (`status`, and `<vm>.paths.json` in its state directory, which a restarted agent
  and a restarted nbdkit use) must be the same files: two views are two sides, and the one that
  is not served is stale the moment the guest writes.
- "Exactly one intact side": every disk on the side the outcome names (destination finals after
  a success, the sources otherwise), the mirror node idle (no stun, no mirror installed), and the
  data of that side equal to what the guest was acknowledged (fio's replay, the writer's model).
- Invariants of the first migration (the faulted one) and of the next one (no fault, a fresh
  destination) have distinct names, so the summary can tell "lost at the fault" from "lost later".
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.plan import PARTIAL_SUFFIX

# Every invariant, in report order; the summary counts violations of each.
INVARIANTS = (
    "outcome_recorded",            # the agent has an end record: success, failed or aborted
    "guest_saw_no_error",          # no guest request failed, except those of a killed nbdkit
    "stun_within_lease",           # no guest request waited past the lease (+ slack)
    "acked_writes_kept",           # the served side holds every acknowledged write (fio + writer)
    "one_intact_side",             # every disk served from the side the outcome names; mirror node idle
    "agent_agrees_with_nbdkit",    # the agent's status and paths.json name the served files
    "no_complete_looking_partial", # DEST/<name> exists only after a success (and then all of them)
    "cli_exit_matches",            # `svmotion migrate` exit code = the recorded outcome
    "next_migration_succeeds",     # one more migration, no fault, fresh destination: success
    "next_guest_saw_no_error",
    "next_data_intact",            # after it: every acknowledged write, on the new destination
    "source_frozen_after_switchover",  # a source left behind by a success is never written again
    "nbdkit_never_crashed",        # the mirror node ends only when the harness kills it
)
STALL_SLACK_S = 1.5               # load on a shared 2-core machine; a lease is seconds


@dataclass
class Check:
    ok: bool | None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def held(detail: str = "") -> Check:
    return Check(True, detail)


def violated(detail: str) -> Check:
    return Check(False, detail)


def not_applicable(why: str) -> Check:
    return Check(None, why)


@dataclass
class World:
    """What the agent, the mirror node and the disk say after a migration ended."""
    outcome: dict[str, Any] | None          # the agent's `last` record
    agent_disks: dict[str, str]             # the agent's status: disk -> path
    saved_disks: dict[str, str] | None      # <vm>.paths.json (None: none saved)
    served_disks: dict[str, str]            # nbdkit's hello: disk -> path
    plugin_disks: dict[str, dict[str, Any]] # the mirror node's status per disk
    plugin_stun: Any


def outcome_recorded(world: World, migration_id: str | None) -> Check:
    rec = world.outcome
    if rec is None:
        return violated("the agent has no record of the migration's end")
    if rec.get("state") not in ("success", "failed", "aborted"):
        return violated(f"the record's state is {rec.get('state')!r}")
    if migration_id and rec.get("id") != migration_id:
        return violated(f"the last record is migration {rec.get('id')}, not {migration_id}")
    return held(f"{rec['state']}" + (f": {rec.get('error')}" if rec.get("error") else ""))


def effective_state(world: World, finals: dict[str, str]) -> str:
    """The recorded outcome; without a record (outcome_recorded says so), what nbdkit serves."""
    state = (world.outcome or {}).get("state")
    if state is None:
        return "success" if world.served_disks == finals else "failed"
    return state


def one_intact_side(world: World, sources: dict[str, str], finals: dict[str, str]) -> Check:
    """Every disk on the side the outcome names, and the mirror node idle on it."""
    problems = []
    state = effective_state(world, finals)
    side = ("destination", finals) if state == "success" else ("source", sources)
    served = world.served_disks
    on_src = {d for d, p in served.items() if p == sources.get(d)}
    on_dst = {d for d, p in served.items() if p == finals.get(d)}
    if on_src and on_dst:
        problems.append(f"split across sides: {sorted(on_src)} on the source, {sorted(on_dst)} on the destination")
    if served != side[1]:
        problems.append(f"outcome {state} means the {side[0]}, but nbdkit serves {served}")
    if world.plugin_stun is not None:
        problems.append(f"a stun is still held: {world.plugin_stun}")
    busy = {d: s["state"] for d, s in world.plugin_disks.items() if s["state"] != "passthrough" or s.get("dest")}
    if busy:
        problems.append(f"mirror node not idle: {busy}")
    return violated("; ".join(problems)) if problems else held(f"all disks on the {side[0]}")


def agent_agrees(world: World) -> Check:
    problems = []
    if world.agent_disks != world.served_disks:
        problems.append(f"agent status says {world.agent_disks}, nbdkit serves {world.served_disks}")
    if world.saved_disks is not None and world.saved_disks != world.served_disks:
        problems.append(f"paths.json says {world.saved_disks} (a restart would serve that)")
    return violated("; ".join(problems)) if problems else held()


def no_complete_looking_partial(world: World, dest: Path, final_names: list[str], state: str) -> Check:
    """DEST/<name> only after a success; after a success every one of them, no partial left.
    `state`: effective_state()."""
    if not dest.is_dir():
        return not_applicable(f"{dest} is gone")
    try:
        present = set(os.listdir(dest))
    except OSError as err:
        return violated(f"cannot list {dest}: {err}")
    finals = [n for n in final_names if n in present]
    partials = sorted(n for n in present if n.endswith(PARTIAL_SUFFIX))
    if state == "success":
        missing = sorted(set(final_names) - present)
        if missing or partials:
            return violated(f"after success: missing {missing}, partial files left {partials}")
        return held()
    if finals:
        return violated(f"outcome {state}, but {dest} holds complete-looking {sorted(finals)}")
    return held(f"partial files left: {partials}" if partials else "")


def cli_exit_matches(outcome: dict[str, Any] | None, code: int | None, agent_killed: bool) -> Check:
    if agent_killed:
        return not_applicable("the agent the CLI talked to was killed")
    if code is None or outcome is None:
        return violated(f"exit code {code}, outcome {outcome and outcome.get('state')}")
    want = {"success": 0, "failed": 5, "aborted": 6}.get(outcome.get("state"))
    return held(f"exit {code}") if code == want else violated(f"exit {code} for outcome {outcome.get('state')}")


def stun_within_lease(longest_stall: float, lease: float, applicable: bool) -> Check:
    if not applicable:
        return not_applicable("the guest's server was killed")
    limit = lease + STALL_SLACK_S
    text = f"longest guest stall {longest_stall:.3f} s (limit {limit:.1f} s)"
    return held(text) if longest_stall <= limit else violated(text)


def final_names(disks: list[str], files: list[Path], sidecars: list[Path]) -> list[str]:
    return [f"{d}.raw" for d in disks] + [p.name for p in [*files, *sidecars]]
