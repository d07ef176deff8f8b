"""The dirty map (nbd_plugin/dirtymap.py) against a model: a plain set of dirty chunk numbers.

Hypothesis drives random sequences of marks and clears, by byte range and by chunk range, on
maps of every shape that matters: one chunk, a size that is not a multiple of the
granularity (a short last chunk), granularities from 4 KiB to 1 GiB, and enough chunks that the
bitmap spans many bytes (the C scans in `next_dirty` and `dirty_run_end` skip whole bytes).
Ranges are drawn with a bias toward chunk boundaries and the end of the disk. After every step
each query of the map must agree with the model. Runs are derandomized: the same examples on
every run, so a failure here is reproducible and never luck.
"""
from __future__ import annotations

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nbd_plugin.dirtymap import DirtyMap

MAX_FULL_CHUNKS = 80    # 10 bytes of bitmap: long runs of 0x00 and 0xff for the C scans


def near(values: list[int], lo: int, hi: int) -> st.SearchStrategy[int]:
    """An integer in lo..hi, often one of `values` (edges) clipped into the range."""
    edges = sorted({min(max(v, lo), hi) for v in values})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


class DirtyMapMachine(RuleBasedStateMachine):
    map: DirtyMap
    dirty: set[int]

    @initialize(data=st.data(), shift=st.integers(12, 30), full=near([0, 1, 7, 8, 9, 64], 0, MAX_FULL_CHUNKS),
                all_dirty=st.booleans())
    def make(self, data: st.DataObject, shift: int, full: int, all_dirty: bool) -> None:
        granularity = 1 << shift
        tail = data.draw(near([0, 1, 512, granularity - 1], 0 if full else 1, granularity - 1), label="tail")
        self.size = full * granularity + tail
        self.granularity = granularity
        self.chunks = full + (1 if tail else 0)
        self.map = DirtyMap(self.size, granularity, all_dirty=all_dirty)
        self.dirty = set(range(self.chunks)) if all_dirty else set()

    # ---- model helpers ----------------------------------------------------------------------

    def chunk_size(self, chunk: int) -> int:
        return min(self.granularity, self.size - chunk * self.granularity)

    def edges(self) -> list[int]:
        """Chunks where the model changes from clean to dirty or back, and their neighbours."""
        starts = [c for c in self.dirty if c - 1 not in self.dirty]
        ends = [c for c in self.dirty if c + 1 not in self.dirty]
        return [e + d for e in starts + ends for d in (-1, 0, 1)]

    def draw_chunks(self, data: st.DataObject) -> tuple[int, int]:
        """first <= last, both chunks of the disk; often at byte and run boundaries."""
        top = self.chunks - 1
        first = data.draw(near([0, 1, 7, 8, top - 8, top] + self.edges(), 0, top), label="first")
        ahead = [first + d for d in (7, 8, 9, 15, 16)]
        last = data.draw(near([first, top] + ahead + [e for e in self.edges() if e > first], first, top),
                         label="last")
        return first, last

    def draw_bytes(self, data: st.DataObject) -> tuple[int, int]:
        """offset, count > 0 with offset + count <= size: a guest write."""
        g, size = self.granularity, self.size
        offset = data.draw(near([0, g - 1, g, size - g, size - 512, size - 1], 0, size - 1), label="offset")
        room = size - offset
        count = data.draw(near([1, 512, g - offset % g, g, g + 1, room], 1, room), label="count")
        return offset, count

    # ---- changes ----------------------------------------------------------------------------

    @rule(data=st.data())
    def mark_range(self, data: st.DataObject) -> None:
        offset, count = self.draw_bytes(data)
        first, last = offset // self.granularity, (offset + count - 1) // self.granularity
        assert self.map.chunk_range(offset, count) == (first, last)
        touched = set(range(first, last + 1))
        assert self.map.mark_range(offset, count) == len(touched - self.dirty)
        self.dirty |= touched

    @rule(data=st.data())
    def mark(self, data: st.DataObject) -> None:
        first, last = self.draw_chunks(data)
        touched = set(range(first, last + 1))
        assert self.map.mark(first, last) == len(touched - self.dirty)
        self.dirty |= touched

    @rule(data=st.data())
    def clear(self, data: st.DataObject) -> None:
        first, last = self.draw_chunks(data)
        touched = set(range(first, last + 1))
        assert self.map.clear(first, last) == len(touched & self.dirty)
        self.dirty -= touched

    # ---- queries: after every step, each one from every start the copier could use ---------

    @invariant()
    def agrees_with_the_model(self) -> None:
        m, n, dirty = self.map, self.chunks, self.dirty
        assert m.chunks == n and m.memory_bytes() == (n + 7) // 8
        assert m.dirty_count() == len(dirty)
        assert m.dirty_bytes() == sum(self.chunk_size(c) for c in dirty)
        assert [c for c in range(n) if m.is_dirty(c)] == sorted(dirty)
        following: int | None = None          # the next dirty chunk at or after c, from the end
        for c in range(n + 8, -1, -1):
            if c in dirty:
                following = c
            assert m.next_dirty(c) == following, c
        bytes_before, dirty_before = [0], [0]  # prefix sums over chunks 0..c-1
        for c in range(n):
            bytes_before.append(bytes_before[-1] + self.chunk_size(c))
            dirty_before.append(dirty_before[-1] + (c in dirty))
        run_end = n - 1                       # the end of the dirty run that c starts (c - 1: none)
        for first in range(n - 1, -1, -1):
            run_end = run_end if first in dirty and first + 1 in dirty else (first if first in dirty else first - 1)
            for limit in {first, run_end - 1, run_end, run_end + 1, first | 7, (first | 7) + 1, (first | 7) + 9, n - 1}:
                if first <= limit < n:
                    assert m.dirty_run_end(first, limit) == min(run_end, limit), (first, limit)
            for last in {first, first | 7, (first | 7) + 1, run_end + 1, n - 1}:
                if first <= last < n:
                    assert m.any_dirty(first, last) == (dirty_before[last + 1] > dirty_before[first]), (first, last)
                    assert m.chunk_bytes(first, last) == bytes_before[last + 1] - bytes_before[first], (first, last)


DirtyMapMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, derandomize=True,
                                             deadline=None, database=None)
TestDirtyMapAgainstModel = DirtyMapMachine.TestCase


def test_an_empty_disk_has_no_chunks() -> None:
    m = DirtyMap(0, 4096)
    assert (m.chunks, m.dirty_count(), m.dirty_bytes(), m.memory_bytes(), m.next_dirty(0)) == (0, 0, 0, 0, None)
