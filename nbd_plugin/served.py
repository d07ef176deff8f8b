"""The served-disks record: where each disk of the VM lives, made durable before it is served there.

Design notes
- The one fact that must survive any crash is which file holds each disk: after a switchover
  the destination is authoritative, and a process that restarts the VM on its source then
  serves a stale disk and loses every write made since (issue 10, defect 1). The agent cannot
  be the one to record it: it may die between the switchover and its own record, and the lease
  then releases the guest onto the destination anyway. So the mirror node, which makes the
  switch, records it, under the switchover stun, BEFORE the first guest request reaches the new
  side; `nbdkit ... state=FILE` names the record (docs/interfaces.md, section 1).
- Order inside the switchover stun: the last dirty chunks are copied (the two sides are now
  equal and no guest request runs), then this record names the destinations, then the disks
  switch in memory. A crash between the record and the switch is harmless: under the drained
  stun source and destination hold the same bytes, so restarting on either loses nothing.
- Atomic and durable (durable.py): a crash leaves the old record or the new one. Mode 0600: it
  names disk paths.
- The record is also written at start (the paths nbdkit was given) and at `finish` (the final
  names after the agent renamed `*.svmotion-partial`). Between that rename and `finish` it
  names a partial path that no longer exists: readers resolve that with `resolve_renamed`.
"""
from __future__ import annotations

import json
import os
from typing import Any

from .durable import replace_json

PARTIAL_SUFFIX = ".svmotion-partial"


def write_record(path: str, vm: str, disks: dict[str, str]) -> None:
    """Atomically and durably replace the record at `path`: {"vm": vm, "disks": {name: path}}."""
    replace_json(path, {"vm": vm, "disks": disks})


def read_record(path: str) -> dict[str, Any] | None:
    """The record at `path`, or None when there is none or it is unreadable."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    disks = record.get("disks") if isinstance(record, dict) else None
    if not isinstance(disks, dict) or not all(isinstance(p, str) for p in disks.values()):
        return None
    return record


def resolve_renamed(path: str) -> str:
    """A partial path renamed to its final name since it was recorded resolves to the final name."""
    if path.endswith(PARTIAL_SUFFIX) and not os.path.lexists(path):
        final = path[: -len(PARTIAL_SUFFIX)]
        if os.path.lexists(final):
            return final
    return path
