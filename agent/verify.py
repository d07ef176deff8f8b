"""Verification: a VM's disks as its mirror node serves them against reference files, by per-chunk digests.

Design notes
- Two users. `migrate --verify`: after the switchover (the source is closed and frozen then) and
  before the source may be deleted, each destination is compared with its source. `svmotion
  verify VM --against DIR`: on demand, each disk as served with `DIR/<disk>.raw`.
- Digests are computed where the data is: the served side by the mirror node (`digest` op,
  PIECE_BYTES at a time, so one request never holds its control lock long), the reference here,
  reading the file (nbd_plugin/digest.py). Only digests are compared, so a remote destination
  can later answer the same request from its own agent.
- The guest keeps writing after the switchover, so the two sides legitimately diverge. The mirror
  node reports, per piece, the chunks rewritten since the switchover (checked after its read, see
  nbd_plugin/disk.py); those are skipped and counted ("rewritten by the guest since switchover"),
  the rest must match. Without that record (nbdkit restarted since, or the disk was never
  switched over in its life) the reply says `tracked: false`: every chunk is compared, and a
  guest write since the reference was taken shows as a difference.
- A differing chunk is located to the byte: digested again on both sides at finer granularities,
  REFINE_FANOUT pieces at a time. Each disk stops at its first difference.
- Outcome: `match` or `mismatch` (with the first differing disk and offset); anything that stops
  the comparison (a read error, the mirror node gone) raises VerifyError.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from agent.errors import EXIT_VERIFY, SvmotionError
from agent.jsonlines import RemoteError
from agent.plan import human_bytes
from nbd_plugin.backend import Backend, FileBackend, is_nbd_uri, open_backend
from nbd_plugin.backend_nbd import NbdOptions
from nbd_plugin.digest import DIGEST_SIZE, chunk_digests, differing

PIECE_BYTES = 8 << 20
REFINE_FANOUT = 1024

Call = Callable[..., dict[str, Any]]     # JsonLinesClient.call on the mirror node's control socket


class VerifyError(SvmotionError):
    """The comparison could not be completed; the message says which disk and why."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_VERIFY)


@dataclass
class DiskVerdict:
    name: str
    reference: str
    size: int
    verified_bytes: int = 0          # compared and equal
    skipped_bytes: int = 0           # rewritten by the guest since switchover: not compared
    mismatch_offset: int | None = None
    tracked: bool = True


def verify_disks(call: Call, disks: list[tuple[str, str, int]], granularity: int,
                 nbd: NbdOptions | None = None) -> dict[str, Any]:
    """Compare each (disk name, reference path or NBD URI, size); the verification record.

    `nbd`: how a reference behind an NBD URI (a source on another host's datastore) is reached.

    Example: `verify_disks(ctl.call, [("disk0", "/old/disk0.raw", 1 << 30)], 65536)["result"]`
    """
    start = time.monotonic()
    verdicts = []
    for name, reference, size in disks:
        try:
            verdicts.append(verify_disk(call, name, reference, size, granularity, nbd))
        except (OSError, ValueError, RemoteError) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise VerifyError(f"verification could not complete: disk {name} against {reference}: "
                              f"{reason}") from None
    first = next((v for v in verdicts if v.mismatch_offset is not None), None)
    return {
        "result": "match" if first is None else "mismatch",
        "first_mismatch": None if first is None else {"disk": first.name, "offset": first.mismatch_offset,
                                                      "reference": first.reference},
        "granularity": granularity,
        "tracked": all(v.tracked for v in verdicts),
        "verified_bytes": sum(v.verified_bytes for v in verdicts),
        "skipped_bytes": sum(v.skipped_bytes for v in verdicts),
        "seconds": time.monotonic() - start,
        "disks": {v.name: asdict(v) for v in verdicts},
    }


def verify_disk(call: Call, name: str, reference_path: str, size: int, granularity: int,
                nbd: NbdOptions | None = None) -> DiskVerdict:
    """Compare one disk as served with a reference file, piece by piece, up to the first difference."""
    verdict = DiskVerdict(name, reference_path, size)
    reference = open_backend(reference_path, nbd) if is_nbd_uri(reference_path) else \
        FileBackend(reference_path, readonly=True)
    try:
        if reference.size != size:
            verdict.mismatch_offset = min(reference.size, size)
            return verdict
        piece = max(granularity, PIECE_BYTES - PIECE_BYTES % granularity)
        for offset in range(0, size, piece):
            count = min(piece, size - offset)
            theirs, skipped, tracked = _served_digests(call, name, offset, count, granularity)
            verdict.tracked = verdict.tracked and tracked
            ours = chunk_digests(reference, offset, count, granularity)
            bad = next((i for i in differing(ours, theirs) if i not in skipped), None)
            if bad is not None:
                verdict.verified_bytes += bad * granularity - _bytes(skipped, bad, offset, count, granularity)
                verdict.skipped_bytes += _bytes(skipped, bad, offset, count, granularity)
                chunk = offset + bad * granularity
                verdict.mismatch_offset = _locate(call, name, reference, chunk, min(granularity, size - chunk))
                return verdict
            skipped_bytes = _bytes(skipped, len(theirs) // DIGEST_SIZE, offset, count, granularity)
            verdict.skipped_bytes += skipped_bytes
            verdict.verified_bytes += count - skipped_bytes
        return verdict
    finally:
        reference.close()


def _served_digests(call: Call, name: str, offset: int, count: int,
                    granularity: int) -> tuple[bytes, set[int], bool]:
    reply = call("digest", disk=name, offset=offset, count=count, granularity=granularity)
    return bytes.fromhex(reply["digests"]), set(reply["skipped"]), bool(reply["tracked"])


def _bytes(skipped: set[int], below: int, offset: int, count: int, granularity: int) -> int:
    """Bytes of the skipped chunks with an index below `below` (the last chunk may be short)."""
    end = offset + count
    return sum(min(granularity, end - offset - i * granularity) for i in skipped if i < below)


def _locate(call: Call, name: str, reference: Backend, offset: int, length: int) -> int:
    """The first differing byte of a chunk whose digests differ, by finer and finer digests."""
    while length > 1:
        granularity = 1 << max(0, (-(-length // REFINE_FANOUT) - 1).bit_length())
        theirs, skipped, _ = _served_digests(call, name, offset, length, granularity)
        ours = chunk_digests(reference, offset, length, granularity)
        bad = next((i for i in differing(ours, theirs) if i not in skipped), None)
        if bad is None:
            return offset      # rewritten meanwhile: the chunk's start is all that is known
        offset += bad * granularity
        length = min(granularity, length - bad * granularity)
    return offset


def verify_line(verify: dict[str, Any]) -> str:
    """One line for a verification record: its result, what it compared and what it skipped."""
    result = verify.get("result", "?")
    if result == "error":
        return f"verify: ERROR: {verify.get('error')}"
    counts = (f"{human_bytes(verify.get('verified_bytes', 0))} compared, "
              f"{human_bytes(verify.get('skipped_bytes', 0))} skipped (rewritten by the guest since switchover)")
    if not verify.get("tracked", True):
        counts += "; no record of guest writes since a switchover: every chunk compared"
    bad = verify.get("first_mismatch")
    if bad:
        return (f"verify: MISMATCH: disk {bad['disk']} differs from {bad['reference']} at offset {bad['offset']} "
                f"({counts})")
    return f"verify: match, {counts}"
