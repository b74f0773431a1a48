"""SpecEE: early exit guided by speculative tokens (Xu et al. 2025, arXiv 2504.08850).

Each step feeds the pending token through the model one layer at a time and may leave the stack
early:

1. Layers [0, l) run; a drafter reads the residual stream there and proposes the k most likely
   next tokens (the *speculative tokens*). The default drafter is Kangaroo's draft (the adapter block
   and reduced draft head of eej.decoding.speculation): its shallow layers are the target's own first
   l layers, so proposing costs one attention-only adapter block and a (reduced-vocabulary) draft head.
2. At each scheduled layer i >= l: h = final_norm(hidden_i); the logits of the k speculative
   tokens (their LM-head columns), their softmax over the k, and the change of that softmax since
   the last checked layer (the softmax itself at the first check) form a 3k feature vector; a
   per-layer MLP (3k -> H -> 1, sigmoid) predicts whether the model may stop here.
3. Above `threshold` the full-vocabulary argmax at layer i is computed, and the step exits only if
   it is one of the speculative tokens; the token is that argmax. The last layer always decides.

Batches: the decision is made for the whole batch — the batch leaves layer i only when every row
still generating may exit there (`lax.cond` under `vmap` would run both branches; a scalar predicate
skips the work for real; a finished row does not block the others). So a row's tokens depend on its batch (`batch_invariant = False`), and the method
is lossy (`lossless = False`). Sampling draws from the exit layer's distribution; the exit rule
itself is SpecEE's greedy one.

Scheduling (which layers run a predictor): an offline set stored in the settings (chosen by
`eej train specee` from a calibration pass, see eej.train.specee), plus, online, the layers at
`online_offsets` around each of the batch's last `online_window` exit layers (carried in the
method state).

Skipped layers and the KV cache (`kv`):
- "propagate" (CALM, Schuster et al. 2022): each skipped layer gets the K/V its projections give
  the exited hidden state (`eej.model.transformer.propagate_kv`), so later tokens attend to it as usual.
- "drop" (SpecEE's published code): skipped layers store nothing for the exited token. Deeper layers
  hold only the tokens that reached them, packed: layer i's token j sits in slot
  `layer_lengths[b, i]` at the time it ran (RoPE still uses its true position), and a query of layer
  i reads slots 0..its own, so it never sees a missing token or a stale slot. Needs full attention
  (no sliding window: the window is over slots).

method_params = {"drafter": the drafter's params (Kangaroo: {"adapter": ..., "draft_head", "draft_ids"}),
                 "predictors": {"w1": [P, 3k, H], "b1": [P, H], "w2": [P, H], "b2": [P]}}
for the P = N - 1 - l predictor layers l .. N-2 (predictor p belongs to layer l + p).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from eej.config import ModelConfig
from eej.decoding.adaptive import PRIOR_HITS, PRIOR_TRIALS, AdaptiveExit, ExitEconomics
from eej.decoding.methods import MethodError, register_method
from eej.decoding.speculation import (
    adapter_forward,
    check_adapter,
    draft_head,
    load_adapter,
    prefill_tapped,
    random_adapter,
)
from eej.decoding.strategy import StepInputs, StepResult
from eej.model.cache import KVCache, init_cache, write_block
from eej.model.control import cond_in_place
from eej.model.packed import take_columns
from eej.model.transformer import (
    Params,
    embed,
    final_norm,
    layer_kv,
    linear,
    logits_from_hidden,
    qkv,
    run_layer_if,
    run_layers,
    unstack_layers,
)
from eej.settings import check_settings, resolve_path, setting
from eej.weights.artifacts import load_artifact
from eej.weights.registry import Model

KV_MODES = ("propagate", "drop")
PREDICTOR_KEYS = ("w1", "b1", "w2", "b2")
# In a batch of more than one row the checking path stays open while an upper bound on its realized gain per step (the
# layers a checking step saved, less what its checks, wasted heads and entering the path cost) is above 0: the
# discounted mean over about 1 / (1 - GAIN_DECAY) checking steps plus GAIN_Z standard errors, starting from
# GAIN_PRIOR_STEPS steps of mean GAIN_PRIOR and standard deviation GAIN_PRIOR_SD layers. On 8 prompts from the training
# sets (gsm8k, role-play, code; greedy, 128 tokens, SmolLM2-135M), at batch 4 the per-layer rule checked on all 254
# steps and no step exited (current_v37, on the evaluation sets: 0.91-0.92x plain); the bound left 24 checked, probes
# included. At batch 1 the rule's rates see the one row's firings, and what it realized was +0.74 layers a step
# (-199 to +813 a prompt); a gate there closed the path on good prompts' slow starts and kept it closed, so it is
# not used.
GAIN_DECAY = 0.98
GAIN_Z = 2.0
GAIN_PRIOR, GAIN_PRIOR_SD, GAIN_PRIOR_STEPS = 1.0, 3.0, 4.0


def gain_bound(check_gain: jax.Array) -> jax.Array:
    """The checking path's realized gain per step, optimistically: mean + GAIN_Z standard errors, from
    check_gain [3] (discounted sums of gains, squared gains and steps)."""
    total, squares, steps = check_gain[0], check_gain[1], check_gain[2]
    mean = total / steps
    variance = jnp.maximum(squares / steps - mean ** 2, 0.0)
    return mean + GAIN_Z * jnp.sqrt(variance / steps)


# ----------------------------------------------------------------------------- drafters


class Drafter(Protocol):
    """Anything that proposes k candidate next tokens from the residual stream after layers [0, tap_layer).

    A drafter is a frozen dataclass (static under jit); its weights travel as `drafter_params`.
    """

    @property
    def tap_layer(self) -> int:
        """l: the drafter reads the residual stream entering layer l (after layers [0, l))."""

    def validate(self, cfg: ModelConfig, drafter_params: Any) -> None:
        """Raise ValueError if the params don't fit `cfg`."""

    def init_state(self, batch: int, capacity: int, cfg: ModelConfig) -> Any:
        """The drafter's carried state for `batch` rows and `capacity` positions (caches, ...)."""

    def propose(
        self, params: Params, drafter_params: Any, state: Any, hidden: jax.Array, positions: jax.Array, k: int, cfg: ModelConfig
    ) -> tuple[jax.Array, Any]:
        """Candidates for the token after each of a block of tokens.

        hidden: [B, T, D] residual stream after layers [0, tap_layer) of tokens at `positions` [B, T]
        (consecutive, following what `state` has seen). Returns (candidate ids [B, T, k] int32, state).
        """

    def keep(self, params: Params, drafter_params: Any, state: Any, hidden: jax.Array, positions: jax.Array,
             cfg: ModelConfig) -> Any:
        """The state after seeing a block of tokens without proposing (a step that checks no layer)."""


@dataclasses.dataclass(frozen=True)
class KangarooDrafter:
    """Kangaroo's draft (adapter + draft head on layer l) as a SpecEE drafter: the top-k of its logits.

    drafter_params: Kangaroo's method_params ({"adapter": ..., optional "draft_head" [D, V'] and
    "draft_ids" [V']). The state is the adapter's one-layer KV cache.
    """

    exit_layer: int

    @property
    def tap_layer(self) -> int:
        return self.exit_layer

    def validate(self, cfg: ModelConfig, drafter_params: Any) -> None:
        check_adapter("specee's kangaroo drafter", cfg, self.exit_layer, drafter_params)

    def init_state(self, batch: int, capacity: int, cfg: ModelConfig) -> KVCache:
        return init_cache(cfg, batch, capacity, num_layers=1)

    def propose(self, params, drafter_params, state, hidden, positions, k, cfg):
        drafted, state = adapter_forward(drafter_params["adapter"], hidden, state, positions, cfg)
        head, ids = draft_head(params, drafter_params)
        _, top = lax.top_k(linear(drafted, head, impl=cfg.matmul_impl).astype(jnp.float32), k)
        top = top if ids is None else jnp.take(ids, top)
        return top.astype(jnp.int32), state.with_lengths(positions[:, -1] + 1)

    def keep(self, params, drafter_params, state, hidden, positions, cfg):
        _, new_k, new_v = qkv(drafter_params["adapter"], hidden, positions, cfg)  # the adapter's K/V only
        return state.write(0, new_k, new_v, positions).with_lengths(positions[:, -1] + 1)


# ----------------------------------------------------------------------------- predictors and features


def speculative_logits(h_normed: jax.Array, columns: jax.Array) -> jax.Array:
    """Logits [..., k] of the speculative tokens: final-normed states [..., D] times their LM-head columns [..., D, k]."""
    return jnp.einsum("...d,...dk->...k", h_normed.astype(jnp.float32), columns.astype(jnp.float32))


def speculative_features(logits: jax.Array, last_probs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SpecEE's predictor input at one layer from the speculative tokens' logits [..., k].

    last_probs: [..., k] their softmax at the last checked layer (zeros at the first check).
    Returns (features [..., 3k] = logits, softmax over the k, its change; softmax [..., k]).
    """
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.concatenate([logits, probs, probs - last_probs], axis=-1), probs


def predictor_logit(predictors: dict[str, jax.Array], index: int | jax.Array, features: jax.Array) -> jax.Array:
    """Predictor `index`'s pre-sigmoid output for features [..., 3k] -> [...] (sigmoid > t <=> logit > logit(t))."""
    w1, b1 = predictors["w1"][index], predictors["b1"][index]
    w2, b2 = predictors["w2"][index], predictors["b2"][index]
    hidden = jax.nn.relu(features @ w1.astype(jnp.float32) + b1.astype(jnp.float32))
    return hidden @ w2.astype(jnp.float32) + b2.astype(jnp.float32)


def init_predictors(num_layers: int, num_candidates: int, hidden: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    """Random predictors (float32 numpy) for `num_layers` layers: He-initialised first layer, small output layer."""
    rng = np.random.default_rng(seed)
    f = 3 * num_candidates
    return {
        "w1": (rng.standard_normal((num_layers, f, hidden)) * np.sqrt(2.0 / f)).astype(np.float32),
        "b1": np.zeros((num_layers, hidden), np.float32),
        "w2": (rng.standard_normal((num_layers, hidden)) * np.sqrt(1.0 / hidden)).astype(np.float32),
        "b2": np.zeros((num_layers,), np.float32),
    }


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-7), 1 - 1e-7)
    return float(np.log(p) - np.log1p(-p))


# ----------------------------------------------------------------------------- the strategy


@dataclasses.dataclass(frozen=True)
class SpecEE(AdaptiveExit):
    """SpecEE's static settings; the drafter's and predictors' weights travel in method_params.

    drafter: proposes the speculative tokens (see `Drafter`); its tap layer l is the first layer
      that can have a predictor.
    num_candidates: k, the speculative tokens per step.
    threshold: a predictor fires when its sigmoid output exceeds this (1.0: never).
    offline_layers: layers (0-based; layer i = after running i + 1 layers) that always run their
      predictor; None = every layer l .. N-2.
    online_window, online_offsets: also check layers e + o for each of the batch's last
      `online_window` exit layers e (the last layer counts as an exit) and o in `online_offsets`.
      online_window 0 disables online scheduling.
    kv: "propagate" or "drop" (see the module docstring).
    adaptive: of the scheduled layers, check only those where it pays (eej.decoding.adaptive): with f_i the
      rate at which layer i's predictor fires and x_i the rate at which a firing leads to an exit (each the
      observed rate's upper bound `ExitEconomics.optimistic_rate`: a layer firing on a few percent of its checks
      would otherwise read 0 after a dry run and stop being checked, specee_v34),
      layer i is worth its check where g_i = f_i (x_i (N - 1 - i) c_layer - (1 - x_i) c_head) - c_check > 0 (an
      exit's argmax is the step's own head; a firing without an exit wastes one), and the step checks those
      layers only if their expected saving, each g_i weighted by the chance that no lower chosen layer exited
      first, exceeds c_enter: what checking at all costs over a plain step (the drafter's proposal and the
      layer-by-layer loop's conditionals), however few layers are checked. Otherwise the drafter is skipped too
      and the step runs the stack as a plain step does. In a batch of several rows the per-layer rates cannot see a
      rare joint firing (every row at once) as rare soon enough, so there the path is also closed while what it
      realized does not pay: an upper bound on the discounted mean over checking steps of the layers an exit saved
      less the cost of the step's checks, wasted heads and entering the path (`realized_gain`, `gain_bound`) must
      stay above 0. Every `probe_every` steps (more rarely while the probes keep finding nothing that pays) every
      scheduled layer is checked, so the rates and the realized gain stay fresh. False: the schedule as described.
    step_costs: (a step checking no layer, the first predictor layer only and never firing, every predictor layer
      never firing, every layer firing but never exiting), ms; None: the engine measures them.
    exit_prior: per predictor layer l .. N-2, the x_i each generation starts from (worth two observations, as every
      rate's prior): the predictors' held-out precision, which `eej train specee` stores with them (a firing that
      was right — the layer's argmax is the last layer's and a speculative token — is an exit, so x_i is at least
      that); None: 1/2 everywhere.
    """

    name: ClassVar[str] = "specee"
    lossless: ClassVar[bool] = False
    batch_invariant: ClassVar[bool] = False
    # forced: 0 check no layer, 1 check the first predictor layer only, never firing, 2 check every predictor layer
    # never firing, 3 fire everywhere never exiting
    calibration_modes: ClassVar[int] = 4
    # Each generation starts from the predictors' held-out precision, not from the rates the last one ended with:
    # carried, the rarely firing layers' rates (a firing every 10-50 checks) start near 0, those layers go unchecked,
    # and SpecEE exited on 10% of Spec-Bench's steps instead of 21%, no faster (`exit_v33`, docs/adaptive.md; measured
    # before the rule took each rate's upper bound, which keeps such layers checked: not measured since).
    carries_rates: ClassVar[bool] = False

    drafter: Any = KangarooDrafter(2)
    num_candidates: int = setting(4, at_least=1, integer=True)
    threshold: float = setting(0.5, at_least=0.0, at_most=1.0)
    offline_layers: tuple[int, ...] | None = None
    online_window: int = setting(5, at_least=0, integer=True)
    online_offsets: tuple[int, ...] = (-2, -1, 0, 1, 2)
    kv: str = setting("propagate", choices=KV_MODES)
    adaptive: bool = setting(True, choices=(True, False), kw_only=True)
    step_costs: tuple[float, ...] | None = dataclasses.field(default=None, kw_only=True)
    probe_every: int = setting(8, at_least=1, integer=True, kw_only=True)
    exit_prior: tuple[float, ...] | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.exit_prior is not None:
            object.__setattr__(self, "exit_prior", tuple(float(x) for x in self.exit_prior))
        if self.offline_layers is not None:
            object.__setattr__(self, "offline_layers", tuple(sorted(set(int(i) for i in self.offline_layers))))
        object.__setattr__(self, "online_offsets", tuple(int(o) for o in self.online_offsets))
        super().__post_init__()

    @property
    def first_layer(self) -> int:
        """The first layer with a predictor (the drafter's tap layer)."""
        return self.drafter.tap_layer

    def predictor_layers(self, cfg: ModelConfig) -> range:
        return range(self.first_layer, cfg.num_layers - 1)

    def validate(self, cfg: ModelConfig, method_params: Any) -> None:
        n, l = cfg.num_layers, self.first_layer
        if not 0 <= l < n - 1:
            raise ValueError(f"specee drafter tap layer {l} must leave at least one predictor layer below the last of {n}")
        if not isinstance(method_params, dict) or "drafter" not in method_params or "predictors" not in method_params:
            raise ValueError("specee needs method_params {'drafter': ..., 'predictors': ...} (see `eej train specee`)")
        self.drafter.validate(cfg, method_params["drafter"])
        pred = method_params["predictors"]
        missing = [k for k in PREDICTOR_KEYS if k not in pred]
        if missing:
            raise ValueError(f"specee predictors lack {', '.join(missing)}")
        p, f = n - 1 - l, 3 * self.num_candidates
        w1 = tuple(np.shape(pred["w1"]))
        if len(w1) != 3 or w1[:2] != (p, f):
            raise ValueError(
                f"specee predictors w1 has shape {w1}; the settings need [{p} layers ({l}..{n - 2}), {f} = 3 x "
                f"{self.num_candidates} features, H]"
            )
        h = w1[2]
        for key, want in (("b1", (p, h)), ("w2", (p, h)), ("b2", (p,))):
            if tuple(np.shape(pred[key])) != want:
                raise ValueError(f"specee predictors {key} has shape {tuple(np.shape(pred[key]))}, expected {want}")
        if self.num_candidates > cfg.vocab_size:
            raise ValueError(f"specee num_candidates {self.num_candidates} exceeds the vocabulary ({cfg.vocab_size})")
        if self.offline_layers is not None:
            bad = [i for i in self.offline_layers if not l <= i < n - 1]
            if bad:
                raise ValueError(f"specee offline_layers {bad} are outside the predictor layers {l}..{n - 2}")
        if self.exit_prior is not None and len(self.exit_prior) != p:
            raise ValueError(f"specee exit_prior has {len(self.exit_prior)} rates; the settings need one per predictor "
                             f"layer ({p}: {l}..{n - 2})")
        if self.kv == "drop" and cfg.sliding_window is not None:
            raise ValueError("specee kv='drop' packs each layer's cache, which a sliding attention window can't use; use kv='propagate'")

    # ------------------------------------------------------------------ state

    def _initial_state(self, drafter_state: Any, prompt_lens: jax.Array, cfg: ModelConfig) -> dict[str, Any]:
        batch = prompt_lens.shape[0]
        state = {
            "drafter": drafter_state,
            "recent_exits": jnp.full((max(self.online_window, 1),), -1, jnp.int32),
            "exit_counts": jnp.zeros((cfg.num_layers,), jnp.int32),
        }
        if self.kv == "drop":
            state["layer_lengths"] = jnp.broadcast_to(prompt_lens[:, None], (batch, cfg.num_layers)).astype(jnp.int32)
        state["economics"] = ExitEconomics.start(2 * cfg.num_layers, self.step_costs or self._layer_costs(cfg),
                                                 self._prior(cfg))
        # [3]: discounted sums over the checking steps of their realized gains (layers), of its squares, and of 1
        state["check_gain"] = GAIN_PRIOR_STEPS * jnp.asarray([GAIN_PRIOR, GAIN_PRIOR ** 2 + GAIN_PRIOR_SD ** 2, 1.0],
                                                             jnp.float32)
        return state

    def _prior(self, cfg: ModelConfig) -> np.ndarray | None:
        """[2N] the rates (f_i, then x_i) a generation starts from; None: ExitEconomics' default prior for each."""
        if self.exit_prior is None:
            return None
        n = cfg.num_layers
        prior = np.full((2 * n,), PRIOR_HITS / PRIOR_TRIALS, np.float32)
        prior[n + self.first_layer: 2 * n - 1] = self.exit_prior
        return prior

    def _layer_costs(self, cfg: ModelConfig) -> tuple[float, float, float, float]:
        """The four step costs in layers (before measuring): entering the checking path ~1/2 of a layer (SmolLM2-135M
        on a CPU: 0.5 ms against 0.77 ms a layer), a predictor ~1/20, the full head V D multiply-adds against a
        layer's weights."""
        n, p = cfg.num_layers, len(self.predictor_layers(cfg))
        d, f = cfg.hidden_size, cfg.ffn_size
        head = cfg.vocab_size * d / (2 * d * (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim + 3 * d * f)
        enter, check = 0.5, 0.05
        return float(n), n + enter + check, n + enter + check * p, n + enter + (check + head) * p

    def check(self) -> None:
        if self.step_costs is not None and (len(self.step_costs) != 4 or min(self.step_costs) <= 0):
            raise ValueError("specee step_costs must be 4 positive times: checking no layer, the first only, every "
                             "predictor layer, every layer firing")
        if self.exit_prior is not None and not all(0.0 <= x <= 1.0 for x in self.exit_prior):
            raise ValueError("specee exit_prior must hold rates in [0, 1], one per predictor layer")

    def _checked_layers(self, econ: ExitEconomics, scheduled: jax.Array, cfg: ModelConfig) -> jax.Array:
        """[N] bool: the `scheduled` [N] layers this step checks by the observed rates and the step costs (see
        `adaptive` in the class docstring): those whose exits save more than their checks and wasted heads cost,
        and none when together they do not save what entering the checking path costs.

        A check costs its predictor; a firing predictor costs a full-vocabulary argmax, which is wasted when the
        argmax is not a speculative token (no exit) and is the step's own head when it is (the exit then saves
        the layers above i).
        """
        n = cfg.num_layers
        per_layer, check, enter, head = self._unit_costs(econ, cfg)
        fires, exits = econ.optimistic_rate[:n], econ.optimistic_rate[n:]
        saved = (n - 1 - jnp.arange(n)) * per_layer
        gain = fires * (exits * saved - (1 - exits) * head) - check
        chosen = scheduled & (gain > 0)
        leave = jnp.where(chosen, fires * exits, 0.0)
        reach = jnp.concatenate([jnp.ones((1,)), jnp.cumprod(1 - leave)[:-1]])  # no lower chosen layer let it leave
        saving = jnp.sum(jnp.where(chosen, reach * gain, 0.0))
        return chosen & (saving > enter)

    def _unit_costs(self, econ: ExitEconomics, cfg: ModelConfig) -> tuple[jax.Array, ...]:
        """(a layer, a predictor's check, entering the checking path, a full-vocabulary head) from the four measured
        step costs (`step_costs`), in their units."""
        n, p = cfg.num_layers, len(self.predictor_layers(cfg))
        none, one, every, fire = (econ.costs[i] for i in range(4))
        check = jnp.maximum(every - one, 0.0) / max(p - 1, 1)
        return none / n, check, jnp.maximum(one - none - check, 0.0), jnp.maximum(fire - every, 0.0) / p

    def realized_gain(self, econ: ExitEconomics, checked: jax.Array, fired: jax.Array, exit_layer: jax.Array,
                      exited: jax.Array, cfg: ModelConfig) -> jax.Array:
        """What one step on the checking path saved over a plain step, in layers: the layers above an exit, less the
        predictors it checked, the heads of firings that did not exit (an exit's head is the step's own) and
        entering the path. checked, fired: [N] bool; exit_layer: int32; exited: bool."""
        per_layer, check, enter, head = self._unit_costs(econ, cfg)
        saved = jnp.where(exited, cfg.num_layers - 1 - exit_layer, 0).astype(jnp.float32)
        wasted = jnp.sum(fired) - exited.astype(jnp.int32)
        return saved - (jnp.sum(checked) * check + wasted * head + enter) / per_layer

    def schedule(self, recent_exits: jax.Array, cfg: ModelConfig) -> jax.Array:
        """[N] bool: the layers that run their predictor this step (offline set | online neighbourhoods)."""
        n = cfg.num_layers
        offline = np.zeros((n,), bool)
        offline[list(self.predictor_layers(cfg) if self.offline_layers is None else self.offline_layers)] = True
        scheduled = jnp.asarray(offline)
        if self.online_window > 0 and self.online_offsets:
            near = recent_exits[:, None] + jnp.asarray(self.online_offsets, jnp.int32)[None, :]  # [W, O]
            near = jnp.where(recent_exits[:, None] >= 0, near, -1)
            scheduled = scheduled | jnp.any(near.reshape(-1)[:, None] == jnp.arange(n)[None, :], axis=0)
        return scheduled

    # ------------------------------------------------------------------ engine interface

    def prefill(self, params, method_params, tokens, prompt_lens, cache, cfg):
        """Prompt through layers [0, l), the drafter (its state only) and layers [l, N) at full depth."""
        logits, cache, hidden, positions = prefill_tapped(params, tokens, prompt_lens, cache, cfg, self.first_layer)
        drafter_state = self.drafter.init_state(tokens.shape[0], cache.capacity, cfg)
        _, drafter_state = self.drafter.propose(params, method_params["drafter"], drafter_state, hidden, positions, self.num_candidates, cfg)
        return logits, cache, self._initial_state(drafter_state, prompt_lens, cfg)

    def step(self, s: StepInputs) -> StepResult:
        params, cfg, method_state = s.params, s.cfg, s.method_state
        n, l = cfg.num_layers, self.first_layer
        positions = s.positions  # [B, 1]
        econ: ExitEconomics = method_state["economics"]
        scheduled = self.schedule(method_state["recent_exits"], cfg)
        probe = econ.probe_due(self.probe_every)
        paying = self._checked_layers(econ, scheduled, cfg)
        if s.batch > 1:  # a batch exits only where every row may: a joint firing the per-layer rates do not resolve
            paying = paying & (gain_bound(method_state["check_gain"]) > 0)
        if self.adaptive:
            scheduled = jnp.where(probe, scheduled, paying)
        every = jnp.asarray(np.isin(np.arange(n), list(self.predictor_layers(cfg))))
        forced = jnp.where(econ.force == 1, jnp.arange(n) == l, every)
        scheduled = jnp.where(econ.force == 0, False, jnp.where(econ.force > 0, forced, scheduled))
        checking = jnp.any(scheduled) & (self.threshold < 1.0)
        x, cache = run_layers(params, embed(params, s.pending[:, None], cfg), s.cache, positions, cfg, 0, l)

        layer_lengths = method_state.get("layer_lengths")
        no_exit = (jnp.asarray(True), jnp.zeros((s.batch,), jnp.int32), jnp.asarray(n - 1, jnp.int32),
                   jnp.zeros((n,), bool), jnp.zeros((n,), bool))

        def checking_step(state):  # the drafter's candidates [B, k], then the layers, each checking where scheduled
            drafter, cache = state
            candidates, drafter = self.drafter.propose(params, s.method_params["drafter"], drafter, x, positions, self.num_candidates, cfg)
            cache, out = self._layer_by_layer(s, x, cache, scheduled, candidates[:, 0], layer_lengths)
            return (drafter, cache), out

        def plain_step(state):  # nothing to check: the drafter keeps up; the layers of a plain step, no per-layer conditionals
            drafter, cache = state
            drafter = self.drafter.keep(params, s.method_params["drafter"], drafter, x, positions, cfg)
            if self.kv == "drop":  # the packed cache needs per-layer slots, which only the layer-by-layer path writes
                none = jnp.zeros((s.batch, self.num_candidates), jnp.int32)
                cache, out = self._layer_by_layer(s, x, cache, scheduled, none, layer_lengths)
            else:
                h, cache = run_layers(params, x, cache, positions, cfg, l, n)
                out = (h, *no_exit)
            return (drafter, cache), out

        # One conditional (XLA:GPU reads every predicate back to the host).
        (drafter_state, cache), (x, running, token, exit_layer, checked, fired) = cond_in_place(
            checking, checking_step, plain_step, (method_state["drafter"], cache))
        # x is the exit layer's state (skipped layers pass it through); an exit already drew its token from it. The
        # full LM head on x is the distribution the step decides by (an exit's token is its argmax; the predictors
        # only read the k speculative tokens' logits to decide *whether* to exit): scoring returns it.
        logits = None
        if s.scoring:
            logits = logits_from_hidden(params, x[:, 0], cfg)
            token = jnp.where(running, s.sample(logits), token)
        else:
            token = lax.cond(running, lambda: s.sample(logits_from_hidden(params, x[:, 0], cfg)), lambda: token)

        state = dict(method_state)
        state["drafter"] = drafter_state
        state["recent_exits"] = jnp.concatenate([method_state["recent_exits"][1:], exit_layer[None]])
        state["exit_counts"] = method_state["exit_counts"] + (jnp.arange(n) == exit_layer).astype(jnp.int32)
        if self.kv == "drop":
            ran = (jnp.arange(n) <= exit_layer).astype(jnp.int32)
            state["layer_lengths"] = layer_lengths + ran[None, :]
        left = fired & (jnp.arange(n) == exit_layer) & ~running  # the layer a firing predictor let the token leave at
        state["economics"] = econ.observe(jnp.concatenate([fired, left]).astype(jnp.float32),
                                          jnp.concatenate([checked, fired]).astype(jnp.float32), probe, probe, jnp.any(paying))
        exited = exit_layer < n - 1
        gain = self.realized_gain(econ, checked, fired, exit_layer, exited, cfg)
        on_path = checking & (econ.force < 0)  # calibration steps are forced, not chosen: they teach nothing here
        state["check_gain"] = jnp.where(on_path, GAIN_DECAY * method_state["check_gain"] + jnp.stack([gain, gain ** 2, 1.0]),
                                        method_state["check_gain"])
        return StepResult.one_token(token, cache, state, forwards=1, layers=exit_layer + 1, exited=exited,
                                    checked=checking, logits=logits)

    def _layer_by_layer(self, s: StepInputs, x: jax.Array, cache: KVCache, scheduled: jax.Array, candidates: jax.Array,
                        layer_lengths: jax.Array | None) -> tuple[KVCache, tuple]:
        """Layers [l, N), each checking its predictor where `scheduled` [N] until the batch exits.

        x: [B, 1, D] the residual stream entering layer l; candidates: [B, k] the speculative tokens.
        Returns (cache, (x leaving the exit layer, running, token [B] (drawn where the batch exited), exit layer,
        checked [N], fired [N])).
        """
        params, cfg, positions = s.params, s.cfg, s.positions
        n, l = cfg.num_layers, self.first_layer
        econ: ExitEconomics = s.method_state["economics"]
        columns = jnp.moveaxis(take_columns(params["lm_head"], candidates), 0, 1)  # [B, D, k]
        predictors = s.method_params["predictors"]
        fire_logit = _logit(self.threshold)
        never = self.threshold >= 1.0
        drop = self.kv == "drop"
        layers = unstack_layers(params["layers"])

        running = jnp.asarray(True)
        token = jnp.zeros((s.batch,), jnp.int32)
        exit_layer = jnp.asarray(n - 1, jnp.int32)
        last_probs = jnp.zeros((s.batch, self.num_candidates), jnp.float32)  # the "change" at the first check is the softmax
        checked, fired = jnp.zeros((n,), bool), jnp.zeros((n,), bool)

        for i in range(l, n):
            def propagate(x, k, v, layer=layers[i]):  # the exited token's K/V in this skipped layer (CALM)
                new_k, new_v = layer_kv(layer, x, positions, cfg)
                return x, write_block(k, new_k, positions), write_block(v, new_v, positions)

            x, cache = run_layer_if(running, layers[i], i, x, cache, positions, cfg,
                                    slots=layer_lengths[:, i : i + 1] if drop else None, otherwise=None if drop else propagate)
            if i == n - 1 or never:
                continue

            def check(carry, i=i, x=x):
                running, token, exit_layer, last_probs, checked, fired = carry
                logits = speculative_logits(final_norm(params, x[:, 0], cfg), columns)
                features, probs = speculative_features(logits, last_probs)
                # One decision for the batch, over the rows still generating (a finished row never blocks an exit).
                fire = jnp.all((predictor_logit(predictors, i - l, features) > fire_logit) | ~s.active)
                fire = jnp.where((econ.force == 1) | (econ.force == 2), False, jnp.where(econ.force == 3, True, fire))

                def verify(_):  # SpecEE's rule on the argmax; the token itself is drawn from this layer's logits
                    full = logits_from_hidden(params, x[:, 0], cfg)
                    top = jnp.argmax(full, axis=-1).astype(jnp.int32)
                    speculative = jnp.any(top[:, None] == candidates, axis=-1) | ~s.active
                    return jnp.all(speculative) & (econ.force != 3), top if s.sampling.greedy else s.sample(full)

                leave, drawn = lax.cond(fire, verify, lambda _: (jnp.asarray(False), token), None)
                return (~leave, jnp.where(leave, drawn, token), jnp.where(leave, i, exit_layer), probs,
                        checked.at[i].set(True), fired.at[i].set(fire))

            carry = (running, token, exit_layer, last_probs, checked, fired)
            running, token, exit_layer, last_probs, checked, fired = lax.cond(running & scheduled[i], check, lambda c: c, carry)
        return cache, (x, running, token, exit_layer, checked, fired)


# ----------------------------------------------------------------------------- registration


@dataclasses.dataclass(frozen=True)
class SpecEESettings:
    """What `configs/<model>/specee.yaml` presets hold.

    predictors: path of the trained predictors (`eej train specee`); its header names the drafter
      (a Kangaroo artifact), its draft vocabulary and the candidates count it was trained with.
    threshold, offline_layers, online_window, online_offsets, kv, adaptive, probe_every: see `SpecEE`.
      offline_layers: a list, "trained" (the set the training's calibration pass chose) or "all".
    """

    predictors: str
    threshold: float = setting(0.5, at_least=0.0, at_most=1.0)
    offline_layers: Any = "trained"
    online_window: int = setting(5, at_least=0, integer=True)
    online_offsets: tuple[int, ...] = (-2, -1, 0, 1, 2)
    kv: str = setting("propagate", choices=KV_MODES)
    adaptive: bool = setting(True, choices=(True, False))
    probe_every: int = setting(8, at_least=1, integer=True)

    def __post_init__(self) -> None:
        check_settings(self, "specee")
        if isinstance(self.offline_layers, str) and self.offline_layers not in ("trained", "all"):
            raise ValueError(f"specee offline_layers must be a list, 'trained' or 'all', got {self.offline_layers!r}")


def load_specee(model: Model, settings: SpecEESettings) -> tuple[SpecEE, dict]:
    """(strategy, method_params) from trained predictors and the drafter they name; checks both fit."""
    arrays, header = load_artifact(resolve_path(settings.predictors), "specee", model.cfg)
    trained = header.get("settings", {})
    drafter = trained.get("drafter", {})
    try:
        exit_layer = int(drafter["exit_layer"])
        drafter_params = load_adapter(model, drafter["adapter"], exit_layer, int(drafter.get("draft_vocab_size", 0)))
    except KeyError as e:
        raise MethodError(f"{settings.predictors} does not name its drafter ({e} missing in the header)") from None
    digest = drafter_digest(drafter_params)
    if drafter.get("digest") and drafter["digest"] != digest:
        raise MethodError(
            f"{settings.predictors} was trained with another drafter than {drafter['adapter']} holds now "
            f"(digest {drafter['digest'][:12]} vs {digest[:12]}); retrain the predictors"
        )
    offline = {"trained": trained.get("offline_layers"), "all": None}.get(settings.offline_layers, settings.offline_layers) \
        if isinstance(settings.offline_layers, str) else settings.offline_layers
    strategy = SpecEE(
        drafter=KangarooDrafter(exit_layer),
        num_candidates=int(trained.get("num_candidates", 4)),
        threshold=settings.threshold,
        offline_layers=None if offline is None else tuple(offline),
        online_window=settings.online_window,
        online_offsets=tuple(settings.online_offsets),
        kv=settings.kv,
        adaptive=settings.adaptive,
        probe_every=settings.probe_every,
        exit_prior=_held_out_precision(header, exit_layer, model.cfg.num_layers),
    )
    predictors = {k: jnp.asarray(arrays["predictors"][k], jnp.float32) for k in PREDICTOR_KEYS}
    return strategy, {"drafter": drafter_params, "predictors": predictors}


def _held_out_precision(header: dict, first_layer: int, num_layers: int) -> tuple[float, ...] | None:
    """The predictors' held-out precision per layer first_layer .. num_layers - 2 from their artifact's header (what
    `eej train specee` reports); None where the header lacks a layer's."""
    per_layer = {row.get("layer"): row.get("precision") for row in header.get("held_out", {}).get("per_layer", [])
                 if isinstance(row, dict)}
    precision = [per_layer.get(i) for i in range(first_layer, num_layers - 1)]
    return None if any(not isinstance(x, (int, float)) for x in precision) else tuple(float(x) for x in precision)


def drafter_digest(drafter_params: dict) -> str:
    """A short fingerprint of a drafter's weights (what predictors trained on its candidates depend on)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(drafter_params), key=lambda kv: jax.tree_util.keystr(kv[0])):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32 if np.asarray(leaf).dtype.kind == "f" else np.int64)).tobytes())
    return digest.hexdigest()


def random_specee(model: Model, seed: int, **overrides: Any) -> tuple[SpecEE, dict]:
    """An untrained SpecEE for any model (tests): a random Kangaroo drafter and random predictors.

    The predictors' output bias is set so that they fire often, and the threshold low, so that a
    random instance exits early now and then (exercising both KV paths).
    """
    cfg = model.cfg
    fields: dict[str, Any] = dict(
        drafter=KangarooDrafter(min(1, cfg.num_layers - 2)), num_candidates=4, threshold=0.3,
        kv="drop" if cfg.sliding_window is None else "propagate",
    )
    fields.update(overrides)
    fields.setdefault("step_costs", SpecEE(**fields)._layer_costs(cfg))  # in layers: no calibration in tests
    strategy = SpecEE(**fields)
    pred = init_predictors(cfg.num_layers - 1 - strategy.first_layer, strategy.num_candidates, hidden=16, seed=seed)
    pred["b2"] = pred["b2"] + 2.0
    return strategy, {"drafter": random_adapter(model, seed), "predictors": jax.tree.map(jnp.asarray, pred)}


register_method("specee", settings=SpecEESettings, load=load_specee, random=random_specee)
