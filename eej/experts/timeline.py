"""A transfer-time model of offloaded decoding, driven by the exact loads an `OffloadedDecoder` performed.

Where no accelerator is at hand, the hit rates and bytes moved are exact (recorded), and the time they
cost is modelled here:

- one copy engine moves one expert in `expert_bytes / bandwidth` seconds, one transfer at a time;
- compute is a sequence of layers; layer l's router is known `attn_s` after the layer starts, its
  experts run for `experts_s` once every expert it needs has arrived (a layer waits for its loads);
- prefetches join a queue when issued — before layer 0 after the fast stream (`fast_s`; M2R2), or when
  layer j's router has run (one layer ahead) — in issue order; a demand load goes ahead of prefetches
  that have not started yet, and a prefetch the layer needs that has not started yet is pulled forward
  as a demand load;
- transfers still running when a step ends delay the next step's transfers (carried over).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Sequence

from eej.experts.offload import StepRecord


@dataclasses.dataclass(frozen=True)
class Costs:
    """Modelled costs in seconds (per decode step of the batch) and bytes per second."""

    attn_s: float  # one layer's attention + router
    experts_s: float  # one layer's chosen experts
    other_s: float  # embedding + final norm + head, once per step
    fast_s: float  # the fast stream (0 without ahead-of-time loading)
    bandwidth: float  # host -> device bytes/s
    expert_bytes: int


def simulate(records: Sequence[StepRecord], costs: Costs) -> list[float]:
    """Modelled wall time of each recorded step."""
    transfer = costs.expert_bytes / costs.bandwidth
    times, carry = [], 0.0
    for rec in records:
        engine = carry  # when the copy engine is free, relative to this step's start
        pending: deque[tuple[float, int, int]] = deque()  # (issue time, layer, expert), in issue order
        arrival: dict[tuple[int, int], float] = {}
        demand: dict[int, list[int]] = {}
        issued: dict[int, list[tuple[int, int]]] = {}
        for ld in rec.loads:
            if ld.kind == "demand":
                demand.setdefault(ld.layer, []).append(ld.expert)
            else:
                issued.setdefault(ld.issued_after, []).append((ld.layer, ld.expert))

        def run_prefetches_until(t: float) -> None:
            nonlocal engine
            while pending and max(engine, pending[0][0]) < t:
                issue, layer, expert = pending.popleft()
                engine = max(engine, issue) + transfer
                arrival[(layer, expert)] = engine

        now = costs.fast_s
        pending.extend((now, layer, e) for layer, e in issued.get(-1, []))
        for layer, needed in enumerate(rec.needed):
            ready = now + costs.attn_s
            run_prefetches_until(ready)
            urgent = list(demand.get(layer, []))
            for item in list(pending):  # prefetched for this layer but not started: fetch it now
                if item[1] == layer and item[2] in needed:
                    pending.remove(item)
                    urgent.append(item[2])
            t = max(engine, ready)
            for e in urgent:
                t += transfer
                arrival[(layer, e)] = t
            engine = max(engine, t)
            pending.extend((ready, lay, e) for lay, e in issued.get(layer, []))
            waits = [arrival.get((layer, e), 0.0) for e in needed]
            now = max([ready, *waits]) + costs.experts_s
        run_prefetches_until(float("inf"))  # leftover prefetches occupy the engine into the next step
        step = now + costs.other_s
        times.append(step)
        carry = max(0.0, engine - step)
    return times
