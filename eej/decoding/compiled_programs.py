"""Every Engine's compiled programs, in one least-recently-used store per process, keyed by what a program is and
kept clear of the kernel's limit on memory maps.

A program's key is everything its compiled code depends on — the function, its static settings (model config,
strategy, sampling, ...), every argument's shape, dtype and placement, and the process-wide settings read while it
is traced (eej.model.transformer.trace_settings) — and not which Engine asked for it: engines of the same model,
method and shapes that live at the same time (the tests' plain references beside a module's engine, `eej.api`'s
engines) run one set of programs instead of compiling their own. A program goes when the last engine that used it
does. Keeping programs after that, for an engine yet to come, was tried and lost: the eight most recently unused,
kept, made a test file 13% slower (tests/test_kangaroo.py 416 s against 369 s, one process, cold caches), whatever
they saved in compiles. An engine built with `share_programs=False` (a benchmark's contestants, an experiment that
swaps a traced function between engines) has programs of its own, in the same store, so that its compile, and
where the compiled code landed in memory, are its own.

XLA's CPU backend loads each compiled kernel as an object of its own, three memory maps apiece (code, read-only
data, data): the prefill and decode loop of one batch of SmolLM2-135M add ~650 maps for plain decoding, ~1800 for
Kangaroo or M2R2, and every further prompt-length bucket, batch size or cache size compiles more. Linux caps a process's maps at
`vm.max_map_count` (65530 by default), and at the cap LLVM's next allocation fails and the process aborts
("LLVM compilation error: Cannot allocate memory"), losing whatever it had measured: eleven methods benchmarked
in one process did exactly that. So before each compile, while the process holds more than the limit minus a
reserve, the least recently used programs of any engine are released; one needed again is compiled again (or
loaded from the persistent compilation cache, eej.local_cache). Off Linux nothing is counted and nothing released.
"""

from __future__ import annotations

import collections
import gc
import itertools
from typing import Callable, Hashable

MAPS_PATH = "/proc/self/maps"
LIMIT_PATH = "/proc/sys/vm/max_map_count"


class ProgramMemoryError(OSError):
    """The process is at the kernel's memory-map limit with no compiled program left to release."""


def _line_count(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def map_count() -> int | None:
    """Memory maps this process holds now (None where /proc is not there to say)."""
    return _line_count(MAPS_PATH)


def map_limit() -> int | None:
    """The kernel's cap on a process's memory maps, `vm.max_map_count` (None where unknown)."""
    return _read_int(LIMIT_PATH)


HEADROOM = 2048
"""Maps a single compile may add here and still finish (M2R2's prefill and decode loop add ~1850 together)."""


def reserve_for(limit: int) -> int:
    """Maps kept free for the next compile and everything else the process maps: an eighth of the limit, at least
    4096 (the largest engine here adds ~1850 for its prefill and decode loop together)."""
    return max(4096, limit // 8)


_OWNERS = itertools.count()


def new_owner() -> int:
    """A fresh owner id (one per Engine; ids are never reused, unlike `id()`)."""
    return next(_OWNERS)


class CompiledPrograms:
    """Compiled programs by key, least recently used first (one process-wide instance: PROGRAMS), with the owners
    (engines) that use each.

    `count` and `limit` read the process's map count and the kernel's cap (injectable for tests); `released`
    counts the programs let go to stay under `limit - reserve_for(limit)`.
    """

    def __init__(self, count: Callable[[], int | None] = map_count, limit: Callable[[], int | None] = map_limit):
        self._programs: collections.OrderedDict[Hashable, Callable] = collections.OrderedDict()
        self._users: dict[Hashable, set[int]] = {}
        self._count, self._limit = count, limit
        self.released = 0

    def get(self, owner: int, key: Hashable) -> Callable | None:
        """The program under `key` (None if there is none), now used by `owner` too."""
        program = self._programs.get(key)
        if program is not None:
            self._programs.move_to_end(key)
            self._users.setdefault(key, set()).add(owner)
        return program

    def put(self, owner: int, key: Hashable, program: Callable) -> None:
        self._programs[key] = program
        self._users.setdefault(key, set()).add(owner)

    def forget(self, owner: int) -> None:
        """`owner` (an Engine) is gone: the programs no other owner uses go too."""
        for key in [k for k, users in self._users.items() if owner in users]:
            self._users[key].discard(owner)
            if not self._users[key]:
                self._drop(key)

    def _drop(self, key: Hashable) -> None:
        self._programs.pop(key, None)
        self._users.pop(key, None)

    def clear(self) -> None:
        """Drop every program (their maps and memory go with their last reference)."""
        for key in list(self._programs):
            self._drop(key)
        gc.collect()

    def __len__(self) -> int:
        return len(self._programs)

    def make_room(self) -> int:
        """Release least recently used programs until the process holds at most `limit - reserve` maps.

        Returns how many were released. Raises ProgramMemoryError when, with all of them released, the process is
        still within HEADROOM of the limit, where the next compile could abort it (the maps are someone else's:
        another library, or programs still referenced); between the two it goes on.
        """
        limit = self._limit()
        count = self._count()
        if limit is None or count is None:
            return 0
        line = limit - reserve_for(limit)
        released = 0
        while count > line and self._programs:
            self._drop(next(iter(self._programs)))
            released += 1
            gc.collect()  # an executable's maps go when its last reference does; cycles hold some
            count = self._count() or 0
        self.released += released
        if count > limit - HEADROOM:
            raise ProgramMemoryError(
                f"this process holds {count} memory maps of the kernel's limit of {limit} (vm.max_map_count) and "
                f"eej has no compiled program left to release; raise the limit (e.g. `sudo sysctl -w "
                f"vm.max_map_count={4 * limit}`) or run fewer models or methods in one process"
            )
        return released


PROGRAMS = CompiledPrograms()
"""The process's store: every Engine compiles through it (Engine._get)."""
