"""A fixed-capacity, least-recently-used expert cache per layer: which expert sits in which device slot.

Pure bookkeeping (host Python): the offloaded executor (eej.experts.offload) asks it where an expert lives
and what to load; the same object, driven by recorded routing, gives exact hit rates and bytes moved.

Per layer there are `capacity` slots. `request(layer, experts, kind)` makes every listed expert resident:
hits are refreshed, misses are assigned a slot — an empty one, else the least recently used slot whose
expert is not in the same request — and reported as loads the caller must perform *before* reading that
slot. kind "demand" is a load the layer waits for; kind "prefetch" is ahead-of-time (its expert is marked
as prefetched until used, to count useful vs wasted prefetches).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Literal

Kind = Literal["demand", "prefetch"]


class CacheCapacityError(ValueError):
    """A request needs more distinct experts in one layer than the cache holds."""


@dataclasses.dataclass
class CacheStats:
    """Counts over every request so far (expert granularity)."""

    demand_hits: int = 0  # a needed expert was already resident (loaded on demand earlier, or prefetched and used before)
    prefetch_hits: int = 0  # a needed expert was resident because a prefetch brought it (first use)
    demand_loads: int = 0  # a needed expert was missing: the layer waits for it
    prefetch_loads: int = 0  # experts loaded ahead of time
    wasted_prefetches: int = 0  # prefetched experts evicted before any use

    @property
    def needed(self) -> int:
        return self.demand_hits + self.prefetch_hits + self.demand_loads

    @property
    def hit_rate(self) -> float:
        """Share of needed experts that were resident when the layer asked for them."""
        return (self.demand_hits + self.prefetch_hits) / max(1, self.needed)

    @property
    def loads(self) -> int:
        return self.demand_loads + self.prefetch_loads

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "needed": self.needed, "hit_rate": round(self.hit_rate, 5), "loads": self.loads}


@dataclasses.dataclass(frozen=True)
class Load:
    """Put `expert` of `layer` into `slot` (overwriting whatever was there).

    issued_after: when the load was issued — after layer `issued_after`'s router ran; -1 = before layer 0.
    """

    layer: int
    expert: int
    slot: int
    kind: Kind
    issued_after: int = -1


class ExpertCache:
    """LRU slots per layer: `slot_of(layer, expert)`, `request(...)` -> loads to perform."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int) -> None:
        if not 1 <= capacity <= num_experts:
            raise ValueError(f"cache capacity must be in [1, {num_experts}] experts per layer, got {capacity}")
        self.num_layers, self.num_experts, self.capacity = num_layers, num_experts, capacity
        self._slots = [[-1] * capacity for _ in range(num_layers)]  # expert id per slot, -1 empty
        self._used = [[-1] * capacity for _ in range(num_layers)]  # clock of last use per slot
        self._unused_prefetch = [set() for _ in range(num_layers)]  # experts prefetched and not yet used
        self._clock = 0
        self.stats = CacheStats()

    def resident(self, layer: int) -> list[int]:
        """Expert id held by each slot of `layer` (-1: empty)."""
        return list(self._slots[layer])

    def slot_of(self, layer: int, expert: int) -> int:
        """The slot holding `expert` of `layer`, or -1."""
        try:
            return self._slots[layer].index(expert)
        except ValueError:
            return -1

    def request(self, layer: int, experts: Iterable[int], kind: Kind = "demand", issued_after: int = -1) -> list[Load]:
        """Make `experts` of `layer` resident; returns the loads to perform (misses), in order.

        issued_after: recorded in each Load (when it was issued; see `Load`)."""
        wanted = list(dict.fromkeys(int(e) for e in experts))
        if len(wanted) > self.capacity:
            raise CacheCapacityError(
                f"layer {layer} needs {len(wanted)} distinct experts at once but the cache holds {self.capacity} "
                "per layer; raise the capacity (or lower the batch size)"
            )
        for e in wanted:
            if not 0 <= e < self.num_experts:
                raise ValueError(f"expert id {e} out of range [0, {self.num_experts})")
        slots, used, unused = self._slots[layer], self._used[layer], self._unused_prefetch[layer]
        loads = []
        for e in wanted:
            self._clock += 1  # one tick per expert: within a request, earlier experts count as less recent
            s = self.slot_of(layer, e)
            if s >= 0:
                if kind == "demand":
                    if e in unused:
                        unused.discard(e)
                        self.stats.prefetch_hits += 1
                    else:
                        self.stats.demand_hits += 1
                    used[s] = self._clock
                continue  # a prefetch of a resident expert is a no-op (it does not refresh recency)
            protected = set(wanted)
            free = [i for i in range(self.capacity) if slots[i] < 0]
            if free:
                s = free[0]
            else:
                s = min((i for i in range(self.capacity) if slots[i] not in protected), key=lambda i: used[i])
                if slots[s] in unused:
                    unused.discard(slots[s])
                    self.stats.wasted_prefetches += 1
            slots[s] = e
            used[s] = self._clock
            if kind == "demand":
                self.stats.demand_loads += 1
            else:
                unused.add(e)
                self.stats.prefetch_loads += 1
            loads.append(Load(layer, e, s, kind, issued_after))
        return loads
