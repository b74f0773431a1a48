"""SkipDecode (Del Corro et al. 2023, arXiv 2307.02628): batched position-wise layer skipping.

The schedule. Let N be the model's layers, W the warm-up layers. The token with generation index t
(t = 0 is the first generated token, which the prefill produced; step t feeds it) is computed by
n(t) layers: the W warm-up layers [0, W) and the top n(t) - W layers [N - (n(t) - W), N). The
layers in between are the identity for that token: it neither reads nor writes their KV.

    n(t) = clip(L_max - floor((L_max - L_min) * t / T), L_min, L_max)

is the paper's linear decay. The paper writes it over absolute positions from the prompt end P to a
budget position; with ragged prompts every row of a batch has its own P, but every row commits
exactly one token per step, so the generation index t = position - P is shared by the whole batch
and the paper's (position - P) / (budget - P) becomes t / T here: T is the number of generated
tokens over which the decay happens. Prompts run at full depth.

The KV invariant: n never increases, so the active set of token t contains that of every later
token; a layer that a token uses therefore holds KV for all earlier positions (prompt included).
`SkipSchedule` refuses schedules that would break it (increasing counts, n > N, W >= n).

Compilation: the layer set changes with t inside the engine's single compiled loop. The warm-up
layers and the top L_min - W layers always run; only the band [N - (L_max - W), N - (L_min - W))
is conditional. `implementation` picks how the band is skipped ("cond": one conditional per band
layer, touching only that layer's cache; "switch": one branch per distinct layer
count; "dynamic": `run_layers_dynamic` over a traced range). docs/skipdecode.md has the
measurements that chose the default.

Fine-tuned weights (LoRA, see eej.train.skipdecode) travel merged in `method_params["layers"]`
and replace the base layers for the prompt and every generated token: zero per-token cost.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from eej.config import ModelConfig
from eej.decoding.methods import register_method
from eej.decoding.strategy import StepInputs, StepResult, Strategy, full_prefill
from eej.model.cache import KVCache
from eej.model.control import switch_in_place
from eej.model.lora import init_lora, merge_lora
from eej.model.transformer import (
    Params,
    embed,
    logits_from_hidden,
    num_layers as count_layers,
    run_layers,
    run_layers_dynamic,
    unstack_layers,
)
from eej.settings import PresetError, check_settings, resolve_path, setting
from eej.weights.artifacts import ArtifactError, load_artifact
from eej.weights.registry import Model

Implementation = Literal["cond", "switch", "dynamic"]
IMPLEMENTATIONS = ("cond", "switch", "dynamic")


class ScheduleError(ValueError):
    """A SkipDecode schedule that is invalid or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class SkipSchedule:
    """Layers per generated token: n(t) = layer_counts[min(t, len - 1)].

    Attributes:
      warmup_layers: W, the bottom layers every token runs.
      layer_counts: n(0), n(1), ..., n(H); constant after H. Must never increase and stay > W.
    """

    warmup_layers: int
    layer_counts: tuple[int, ...]

    def __post_init__(self) -> None:
        counts = tuple(int(n) for n in self.layer_counts)
        object.__setattr__(self, "layer_counts", counts)
        if self.warmup_layers < 0:
            raise ScheduleError(f"warmup_layers must be >= 0, got {self.warmup_layers}")
        if not counts:
            raise ScheduleError("a schedule needs at least one layer count")
        for t in range(1, len(counts)):
            if counts[t] > counts[t - 1]:
                raise ScheduleError(
                    f"layer counts must never increase (the KV invariant): n({t - 1})={counts[t - 1]} < n({t})={counts[t]}"
                )
        if self.warmup_layers >= min(counts):
            raise ScheduleError(
                f"warmup_layers ({self.warmup_layers}) must be below the smallest layer count ({min(counts)}): "
                "every token needs at least one top layer"
            )

    @classmethod
    def linear(cls, warmup_layers: int, max_layers: int, min_layers: int, horizon: int) -> "SkipSchedule":
        """The paper's decay: n(t) = clip(max - floor((max - min) * t / horizon), min, max)."""
        if max_layers < min_layers:
            raise ScheduleError(
                f"max_layers ({max_layers}) < min_layers ({min_layers}): the layer count would increase with position"
            )
        if horizon < 1:
            raise ScheduleError(f"horizon must be >= 1 generated token, got {horizon}")
        t = np.arange(horizon + 1)
        counts = np.clip(max_layers - ((max_layers - min_layers) * t) // horizon, min_layers, max_layers)
        return cls(warmup_layers, tuple(int(n) for n in counts))

    @property
    def max_layers(self) -> int:
        return self.layer_counts[0]

    @property
    def min_layers(self) -> int:
        return self.layer_counts[-1]

    def check_model(self, num_layers: int) -> None:
        """Raise ScheduleError unless the schedule fits a model of `num_layers` layers."""
        if self.max_layers > num_layers:
            raise ScheduleError(f"the schedule uses up to {self.max_layers} layers but the model has {num_layers}")

    def layers_at(self, t: int) -> int:
        """n(t) for a Python int t >= 0."""
        return self.layer_counts[min(max(t, 0), len(self.layer_counts) - 1)]

    def active_layers(self, t: int, num_layers: int) -> tuple[int, ...]:
        """The model layers token t runs, ascending."""
        n = self.layers_at(t)
        return tuple(range(self.warmup_layers)) + tuple(range(num_layers - (n - self.warmup_layers), num_layers))

    def average_layers(self, steps: int) -> float:
        """Mean n(t) over the decode steps t = 0 .. steps-1."""
        return float(np.mean([self.layers_at(t) for t in range(steps)]))

    def counts_at(self, t: jax.Array) -> jax.Array:
        """n(t) for a traced int array t (any shape; t < 0, i.e. prompt tokens, gives the full count max_layers)."""
        table = jnp.asarray(self.layer_counts, jnp.int32)
        return table[jnp.clip(t, 0, len(self.layer_counts) - 1)]

    def band(self, num_layers: int) -> tuple[int, int]:
        """[start, end): the layers some generated tokens run and others skip.

        Generated tokens never run [W, start); they all run [end, N).
        """
        w = self.warmup_layers
        return num_layers - (self.max_layers - w), num_layers - (self.min_layers - w)

    def active_mask(self, t: jax.Array, num_layers: int) -> jax.Array:
        """[..., N] bool: layer l runs for the token with generation index t[...]; prompt tokens (t < 0) run all."""
        n = self.counts_at(t)[..., None]
        layer = jnp.arange(num_layers)
        active = (layer < self.warmup_layers) | (layer >= num_layers - (n - self.warmup_layers))
        return active | (t < 0)[..., None]


def model_layers(params: Params, method_params: Any) -> Params:
    """`params` with the fine-tuned layers of `method_params` (if any) in place of the base ones."""
    if method_params is None:
        return params
    return {**params, "layers": method_params["layers"]}


def _run_band_switch(params, x, cache, positions, cfg, branch, starts, end):
    """One branch per distinct band start, running layers [start, end); its operands are the band's caches only."""
    lo = min(starts)
    band = KVCache(k=cache.k[lo:end], v=cache.v[lo:end], lengths=cache.lengths)

    def make(first: int):
        def run(operand):
            x, band = operand
            return run_layers(params, x, band, positions, cfg, first, end, cache_offset=lo), ()

        return run

    (x, band), _ = switch_in_place(branch, [make(s) for s in starts], (x, band))
    return x, cache.replace(k=cache.k[:lo] + band.k + cache.k[end:], v=cache.v[:lo] + band.v + cache.v[end:])


@dataclasses.dataclass(frozen=True)
class SkipDecode(Strategy):
    """SkipDecode on the shared engine; `method_params` is None or {"layers": fine-tuned layers}.

    method_state: the generation index t of the token the next step feeds (int32 scalar).
    """

    name: ClassVar[str] = "skipdecode"
    lossless: ClassVar[bool] = False
    batch_invariant: ClassVar[bool] = True

    schedule: SkipSchedule
    implementation: Implementation = setting("cond", choices=IMPLEMENTATIONS)

    def validate(self, cfg: ModelConfig, method_params: Any) -> None:
        self.schedule.check_model(cfg.num_layers)
        if method_params is not None:
            if not isinstance(method_params, dict) or "layers" not in method_params:
                raise ValueError("skipdecode method_params must be None or {'layers': fine-tuned layers}")
            depth = count_layers(method_params["layers"])
            if depth != cfg.num_layers:
                raise ValueError(f"fine-tuned skipdecode layers: {depth}, the model has {cfg.num_layers}")

    def prefill(self, params, method_params, tokens, prompt_lens, cache, cfg):
        logits, cache = full_prefill(model_layers(params, method_params), tokens, prompt_lens, cache, cfg)
        return logits, cache, jnp.zeros((), jnp.int32)

    def decode_logits(
        self, params: Params, method_params: Any, cache: KVCache, t: jax.Array, pending: jax.Array, cfg: ModelConfig
    ) -> tuple[jax.Array, KVCache, jax.Array]:
        """Feed `pending` [B] as generation index t (int32 scalar) through its n(t) layers.

        Returns (next-token logits [B, V], cache with its K/V written in those layers, n(t)).
        Lengths are not changed.
        """
        params = model_layers(params, method_params)
        sched, n_layers = self.schedule, cfg.num_layers
        n = sched.counts_at(t)
        positions = cache.lengths[:, None]
        x = embed(params, pending[:, None], cfg)
        x, cache = run_layers(params, x, cache, positions, cfg, 0, sched.warmup_layers)
        start, end = sched.band(n_layers)
        if end > start:
            first_top = n_layers - (n - sched.warmup_layers)
            if self.implementation == "cond":
                x, cache = run_layers(params, x, cache, positions, cfg, start, end, active=jnp.arange(n_layers) >= first_top)
            elif self.implementation == "switch":
                starts = tuple(sorted({n_layers - (c - sched.warmup_layers) for c in sched.layer_counts}))
                branch = jnp.searchsorted(jnp.asarray(starts, jnp.int32), first_top)
                x, cache = _run_band_switch(params, x, cache, positions, cfg, branch, starts, end)
            else:
                x, cache = run_layers_dynamic(params, x, cache, positions, cfg, first_top, jnp.int32(end))
        x, cache = run_layers(params, x, cache, positions, cfg, end, n_layers)
        return logits_from_hidden(params, x[:, 0], cfg), cache, n

    def step(self, s: StepInputs) -> StepResult:
        logits, cache, n = self.decode_logits(s.params, s.method_params, s.cache, s.method_state, s.pending, s.cfg)
        # one (partial-depth) pass counts as a forward; `layers` says how deep
        return StepResult.one_token(s.sample(logits), cache, s.method_state + 1, forwards=1, layers=n,
                                    logits=logits)


# ----------------------------------------------------------------------------- settings and registry


@dataclasses.dataclass(frozen=True)
class SkipDecodeSettings:
    """What `configs/<model>/skipdecode.yaml` presets hold.

    Either the linear schedule (warmup_layers, max_layers, min_layers, horizon) or an explicit
    `layer_counts` table (with warmup_layers). `lora`: a fine-tuned artifact (eej train skipdecode)
    whose schedule must equal this one; None runs the untuned model.
    """

    warmup_layers: int = 2
    max_layers: int | None = None
    min_layers: int | None = None
    horizon: int | None = None
    layer_counts: tuple[int, ...] | None = None
    lora: str | None = None
    implementation: str = setting("cond", choices=IMPLEMENTATIONS)
    budget: str | None = None  # informational: the layer budget this preset targets ("2x")

    def __post_init__(self) -> None:
        check_settings(self, "skipdecode")
        self.schedule()  # a schedule that can't exist is an error in the settings themselves

    def schedule(self) -> SkipSchedule:
        linear = (self.max_layers, self.min_layers, self.horizon)
        if self.layer_counts is not None:
            if any(v is not None for v in linear):
                raise ScheduleError("give either layer_counts or max_layers/min_layers/horizon, not both")
            return SkipSchedule(self.warmup_layers, tuple(self.layer_counts))
        if any(v is None for v in linear):
            raise ScheduleError("a linear schedule needs max_layers, min_layers and horizon")
        return SkipSchedule.linear(self.warmup_layers, *linear)


def fine_tuned_layers(model: Model, lora_path: str, schedule: SkipSchedule) -> dict[str, Any]:
    """method_params for a fine-tuned artifact (LoRA, or all weights of the top layers): the model's layers
    with the trained weights in place."""
    path = resolve_path(lora_path)
    tree, header = load_artifact(path, "skipdecode", model.cfg)
    trained = SkipSchedule(header["schedule"]["warmup_layers"], tuple(header["schedule"]["layer_counts"]))
    if trained != schedule:
        raise ArtifactError(
            f"{path} was trained for schedule W={trained.warmup_layers} n={trained.max_layers}->{trained.min_layers} "
            f"over {len(trained.layer_counts) - 1} tokens, not the one configured "
            f"(W={schedule.warmup_layers} n={schedule.max_layers}->{schedule.min_layers} over {len(schedule.layer_counts) - 1})"
        )
    first = int(header.get("first_layer", 0))
    if "layers" in tree:  # a full fine-tune of layers [first, N)
        trained_layers = unstack_layers(jax.tree.map(lambda a: jnp.asarray(a, model.cfg.jnp_dtype), tree["layers"]))
        return {"layers": unstack_layers(model.params["layers"])[:first] + trained_layers}
    merged = merge_lora(model.params, jax.tree.map(jnp.asarray, tree["lora"]), scale=float(header["lora_scale"]), first_layer=first)
    return {"layers": merged["layers"]}


def load_skipdecode(model: Model, settings: SkipDecodeSettings) -> tuple[SkipDecode, Any]:
    """`--method skipdecode[:PRESET|FILE]`: the schedule, and the fine-tuned layers if the settings name an artifact."""
    schedule = settings.schedule()
    try:
        schedule.check_model(model.cfg.num_layers)
    except ScheduleError as e:
        raise PresetError(f"skipdecode settings: {e}") from None
    strategy = SkipDecode(schedule, settings.implementation)  # type: ignore[arg-type]
    method_params = fine_tuned_layers(model, settings.lora, schedule) if settings.lora else None
    return strategy, method_params


def random_skipdecode(model: Model, seed: int) -> tuple[SkipDecode, Any]:
    """A random valid schedule and random (nonzero) LoRA for any model: the generic tests' instance."""
    rng = np.random.default_rng(seed)
    n = model.cfg.num_layers
    warmup = int(rng.integers(0, n - 1))
    min_layers = int(rng.integers(warmup + 1, n + 1))
    max_layers = int(rng.integers(min_layers, n + 1))
    schedule = SkipSchedule.linear(warmup, max_layers, min_layers, horizon=int(rng.integers(1, 12)))
    lora = init_lora(jax.random.PRNGKey(seed), model.cfg, rank=2)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(lora))
    lora = {name: {**ab, "b": 0.05 * jax.random.normal(k, ab["b"].shape)} for (name, ab), k in zip(lora.items(), keys)}
    return SkipDecode(schedule), {"layers": merge_lora(model.params, lora)["layers"]}


register_method("skipdecode", settings=SkipDecodeSettings, load=load_skipdecode, random=random_skipdecode)
