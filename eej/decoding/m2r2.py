"""M2R2: a rate-accelerated residual stream for early exit and lossless self-speculation.

M2R2 as eej reconstructs it (reconstructed from the abstract of Bhendawade et al. 2025, arXiv 2502.02040): the
paper's body was not available, so the equations, losses and ARLA below are eej's own design (docs/m2r2.md):

- Slow stream: the frozen base model, layers [0, N).
- Fast stream: the same first K layers with low-rank accelerator adapters (LoRA, eej.model.lora,
  merged into copies of those K layers once, at load time, so a fast layer costs what a base layer
  costs). It is trained so that its residual after k layers, f_k, approximates the slow residual
  after tau(k) = min(round(R k), N) layers (R: the rate). Zero adapters make f_k equal the slow
  residual after k layers, layer for layer.
- The fast stream's prediction after k layers: its own RMSNorm + the LM head (or a reduced draft
  head over a frequency-ranked vocabulary subset, `eej.decoding.speculation.reduced_head`).
- Shared KV: fast layer j attends to the model cache's layer j, i.e. to the slow stream's K/V of
  committed tokens. Tokens in flight (drafts) write their fast K/V into the slots at or beyond the
  committed length, which the cache invariant allows (those slots are garbage until overwritten);
  verification overwrites them with slow K/V and rollback is setting the lengths. No second cache.
- ARLA (accelerated residual latent attention): a small attention, in a low dimension, of the
  current token's newest fast state over its fast trajectory [f_1 .. f_k], giving the probability
  that exiting at fast layer k yields the full model's token.

Two methods:

- `m2r2-spec` (lossless, batch-invariant): the fast stream drafts with `draft_loop` (a row stops
  after a draft whose top-1 draft probability is below `exit_threshold`), the slow stream verifies
  [pending, drafts] in one pass over all N layers (`accept`: greedy or lossless sampling), `rollback`.
- `m2r2-exit` (lossy, batch-level): the token climbs the fast stream one layer at a time; at the
  first layer k >= `min_exit_layer` where ARLA's exit probability reaches `exit_threshold` for
  every active row, the batch exits with the full-vocabulary head on f_k, and the layers the token
  skipped get K/V by state propagation (`propagate_kv` of f_k into layers [k, N), as CALM). If ARLA
  never fires within the K fast layers, the token runs the full slow stream (which also replaces its
  fast K/V in layers [0, K) with slow K/V).

method_params = {"fast_layers": tuple of K per-layer dicts (base layer j + its merged adapter),
                 "norm": [D] the fast stream's output RMSNorm weight,
                 ("draft_head": [D, V'], "draft_ids": [V'] int32),   # m2r2-spec, optional
                 ("arla": {...}, see `init_arla`)}                   # m2r2-exit
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eej.config import ModelConfig
from eej.decoding.adaptive import (
    TEST_STEP_COSTS,
    AdaptiveExit,
    ExitEconomics,
    Judged,
    SelfSpeculative,
    judged,
    verify_by_width,
)
from eej.decoding.methods import register_method
from eej.decoding.speculation import accept, check_draft_head, draft_head, draft_loop, head_from_ranking, reduced_head, rollback
from eej.decoding.strategy import StepInputs, StepResult, full_prefill
from eej.model.cache import KVCache
from eej.model.control import cond_in_place
from eej.model.lora import init_lora, merge_lora
from eej.model.transformer import (
    Params,
    embed,
    forward,
    linear,
    logits_from_hidden,
    propagate_kv,
    rms_norm,
    run_layer_if,
    run_layers,
    unstack_layers,
)
from eej.settings import resolve_path, setting
from eej.weights.artifacts import load_artifact
from eej.weights.registry import Model

# ----------------------------------------------------------------------------- the fast stream


def target_depth(k: int, rate: float, num_layers: int) -> int:
    """tau(k): the slow depth the fast residual after k layers is trained to match, min(round(R k), N)."""
    return min(num_layers, int(math.floor(rate * k + 0.5)))


def fast_layers_from_lora(params: Params, lora: dict, num_fast: int, scale: float = 1.0) -> tuple[dict, ...]:
    """The K fast layers: base layers [0, K) with the accelerator adapters merged (per-layer dicts).

    lora: `eej.model.lora` adapters stacked over the K fast layers.
    """
    head = {"layers": tuple(unstack_layers(params["layers"])[:num_fast])}
    return tuple(merge_lora(head, lora, scale)["layers"])


def fast_params(params: Params, method_params: dict) -> Params:
    """The model params with the fast layers in place of layers [0, K) (for `run_layers` over [0, K))."""
    return {**params, "layers": tuple(method_params["fast_layers"])}


def fast_head_logits(method_params: dict, x: jax.Array, head: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The fast stream's prediction: its RMSNorm then `head` [D, V']: x [..., D] -> float32 logits [..., V']."""
    return linear(rms_norm(x, method_params["norm"], cfg.rms_eps), head, impl=cfg.matmul_impl).astype(jnp.float32)


def run_fast(
    params: Params, method_params: dict, x: jax.Array, cache: KVCache, positions: jax.Array, cfg: ModelConfig, end: int | None = None
) -> tuple[jax.Array, KVCache]:
    """Fast layers [0, end) (default all K) over x [B, T, D] at positions [B, T], reading and writing the
    shared model cache's layers [0, end). -> (f_end [B, T, D], cache); lengths unchanged."""
    end = len(method_params["fast_layers"]) if end is None else end
    return run_layers(fast_params(params, method_params), x, cache, positions, cfg, 0, end)


def fast_trajectory(
    params: Params, method_params: dict, x: jax.Array, cache: KVCache, positions: jax.Array, cfg: ModelConfig
) -> tuple[list[jax.Array], KVCache]:
    """[f_1, ..., f_K] (each [B, T, D]) for input x [B, T, D]; f_k approximates the slow residual after
    `target_depth(k, R, N)` layers — what ahead-of-time uses (e.g. routing layer tau(k)'s experts early) read."""
    fast = fast_params(params, method_params)
    states = []
    for j in range(len(method_params["fast_layers"])):
        x, cache = run_layers(fast, x, cache, positions, cfg, j, j + 1)
        states.append(x)
    return states, cache


# ----------------------------------------------------------------------------- ARLA


def init_arla(cfg: ModelConfig, num_fast: int, dim: int = 32, hidden: int = 64, seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    """ARLA params (float32 numpy) for a K-layer fast stream; attention dimension `dim`, MLP width `hidden`.

    {"norm": [D], "q_proj"/"k_proj"/"v_proj": [D, dim], "q_layer"/"k_layer": [K, dim] layer embeddings,
     "w1": [2 dim, hidden], "b1": [hidden], "w2": [hidden], "bias": [K] per-layer exit bias}
    """
    rng = np.random.default_rng(seed)
    d = cfg.hidden_size

    def w(*shape, s):
        return (rng.standard_normal(shape) * s * scale).astype(np.float32)

    return {
        "norm": np.ones((d,), np.float32),
        "q_proj": w(d, dim, s=d**-0.5), "k_proj": w(d, dim, s=d**-0.5), "v_proj": w(d, dim, s=d**-0.5),
        "q_layer": w(num_fast, dim, s=0.1), "k_layer": w(num_fast, dim, s=0.1),
        "w1": w(2 * dim, hidden, s=(2 * dim) ** -0.5), "b1": np.zeros((hidden,), np.float32),
        "w2": w(hidden, s=hidden**-0.5), "bias": np.zeros((num_fast,), np.float32),
    }


def arla_logits(arla: dict, trajectory: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Exit logits [..., K] for a fast trajectory [..., K, D] (f_1..f_K): entry k-1 reads only f_1..f_k.

    u_j = RMSNorm(f_j); q_k = u_k Wq + e^q_k; key_j = u_j Wk + e^k_j; val_j = u_j Wv;
    c_k = sum_{j<=k} softmax_j(q_k . key_j / sqrt(d)) val_j; logit_k = w2 . gelu([q_k, c_k] W1 + b1) + b_k.
    """
    k = trajectory.shape[-2]
    u = rms_norm(trajectory.astype(jnp.float32), arla["norm"], cfg.rms_eps)
    q = u @ arla["q_proj"] + arla["q_layer"][:k]
    keys = u @ arla["k_proj"] + arla["k_layer"][:k]
    vals = u @ arla["v_proj"]
    scores = jnp.einsum("...id,...jd->...ij", q, keys) / math.sqrt(q.shape[-1])
    causal = jnp.arange(k)[:, None] >= jnp.arange(k)[None, :]
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    context = jnp.einsum("...ij,...jd->...id", weights, vals)
    h = jax.nn.gelu(jnp.concatenate([q, context], axis=-1) @ arla["w1"] + arla["b1"])
    return h @ arla["w2"] + arla["bias"][:k]


# ----------------------------------------------------------------------------- add-on checks


def _check_fast(name: str, num_fast: int, cfg: ModelConfig, method_params: Any) -> None:
    if num_fast > cfg.num_layers:
        raise ValueError(f"{name} fast_layers {num_fast} exceeds the model's {cfg.num_layers} layers")
    if not isinstance(method_params, dict) or "fast_layers" not in method_params or "norm" not in method_params:
        raise ValueError(f"{name} needs method_params {{'fast_layers': ..., 'norm': ...}} (trained adapters; see `eej train m2r2`)")
    layers = method_params["fast_layers"]
    if not isinstance(layers, (tuple, list)) or len(layers) != num_fast:
        got = len(layers) if isinstance(layers, (tuple, list)) else type(layers).__name__
        raise ValueError(f"{name} settings ask for {num_fast} fast layers, method_params hold {got}")
    base = {"wq": (cfg.hidden_size, cfg.num_heads * cfg.head_dim), "wk": (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim),
            "w_down": (cfg.num_experts, cfg.moe_ffn_size, cfg.hidden_size) if cfg.is_moe else (cfg.ffn_size, cfg.hidden_size)}
    for j, layer in enumerate(layers):
        for key, shape in base.items():
            got = tuple(np.shape(layer.get(key))) if key in layer else None
            if got != shape:
                raise ValueError(f"{name} fast layer {j} {key} has shape {got}, the model needs {shape}")
    if tuple(np.shape(method_params["norm"])) != (cfg.hidden_size,):
        raise ValueError(f"{name} norm has shape {tuple(np.shape(method_params['norm']))}, the model needs ({cfg.hidden_size},)")


# ----------------------------------------------------------------------------- self-speculation


@dataclasses.dataclass(frozen=True)
class M2R2Spec(SelfSpeculative):
    """Lossless self-speculation: the fast stream drafts, the slow stream verifies.

    fast_layers: K, the fast stream's depth (its draft runs K layers per token).
    exit_threshold: a row stops drafting after a draft whose top-1 draft probability is below this.
    max_draft_steps: the most drafts per step; a step commits at most max_draft_steps + 1 tokens.
    adaptive, step_costs, probe_every: the draft length chosen each step (eej.decoding.adaptive; the fast
      stream's weights differ from the slow stream's, so a probe is one real step drafting one token).
    """

    name: ClassVar[str] = "m2r2-spec"
    lossless: ClassVar[bool] = True
    batch_invariant: ClassVar[bool] = True

    fast_layers: int = setting(6, at_least=1, integer=True)
    exit_threshold: float = setting(0.5, at_least=0.0, at_most=1.0)
    max_draft_steps: int = setting(5, at_least=1, integer=True)

    def validate(self, cfg: ModelConfig, method_params: Any) -> None:
        _check_fast("m2r2-spec", self.fast_layers, cfg, method_params)
        check_draft_head("m2r2-spec", cfg, method_params)

    def speculate(self, s: StepInputs, k, probe, full, then=None):
        params, method_params, cfg, max_k = s.params, s.method_params, s.cfg, self.max_draft_steps
        start = s.cache.lengths
        head, ids = draft_head(params, method_params)

        def draft_fn(cache, token, i):
            # Token i of the block sits at start + i; its fast K/V goes into those (uncommitted) slots.
            x, cache = run_fast(params, method_params, embed(params, token[:, None], cfg), cache, (start + i)[:, None], cfg)
            return cache, fast_head_logits(method_params, x[:, 0], head, cfg)

        draft_key, verify_key = jax.random.split(s.key)
        keys = s.token_keys(max_k + 1)  # [B, K + 1]: the drafted and verified positions' (coupled sampling)
        cache, drafts = draft_loop(
            draft_fn, s.cache, s.pending, draft_key, s.sampling,
            max_steps=max_k, exit_threshold=self.draft_threshold(full), vocab_size=cfg.vocab_size, vocab_ids=ids,
            num_steps=k, keys=keys,
        )
        # The slow stream over [pending, drafts] in one pass: its K/V overwrite the drafts' fast K/V.
        block_tokens = jnp.concatenate([s.pending[:, None], drafts.tokens], axis=1)

        def verify(width: int, cache):
            positions = start[:, None] + jnp.arange(width, dtype=jnp.int32)[None]
            logits, cache = forward(params, block_tokens[:, :width], positions, cache, cfg)
            tokens, counts = accept(drafts.first(width - 1), logits, verify_key, s.sampling, keys)
            return cache, (jnp.pad(tokens, ((0, 0), (0, max_k + 1 - width))), counts)

        cache, (tokens, counts) = verify_by_width(drafts.steps, max_k, verify, cache)
        hits, trials = judged(drafts.num_drafted, counts)
        result = StepResult(
            tokens=tokens,
            counts=counts,
            cache=rollback(cache, start + counts),
            method_state=s.method_state,
            forwards=jnp.ones((s.batch,), jnp.int32),
            layers=jnp.full((s.batch,), drafts.steps * self.fast_layers + cfg.num_layers, jnp.float32),
            drafted=drafts.num_drafted,
        )
        return result, Judged(hits, trials)


# ----------------------------------------------------------------------------- dynamic early exit


@dataclasses.dataclass(frozen=True)
class M2R2Exit(AdaptiveExit):
    """Lossy dynamic early exit from the fast stream, decided by ARLA for the whole batch.

    fast_layers: K; exits are possible after fast layers min_exit_layer..K.
    exit_threshold: the batch exits at the first such layer where ARLA's exit probability is >= this
      for every active row (1.0 never exits unless ARLA is certain: plain decoding's tokens).
    adaptive: try the fast stream only when it pays (eej.decoding.adaptive): with p the observed exit rate
      of attempts and d their mean exit layer, an attempt costs p c_exit(d) + (1 - p) c_fail against a
      plain step's c_plain (a failed attempt runs the K fast layers and then every layer); a plain step
      then skips the fast stream. False: attempt every step, as the method is described.
    step_costs: (c_plain, c_fail, c_exit at layer K), ms; None: the engine measures them.
    probe_every: while not attempting, attempt anyway every this many steps (the rates stay fresh; backing off
      while the attempts keep not paying: eej.decoding.adaptive).
    """

    name: ClassVar[str] = "m2r2-exit"
    lossless: ClassVar[bool] = False
    batch_invariant: ClassVar[bool] = False
    calibration_modes: ClassVar[int] = 3  # forced: 0 a plain step, 1 an attempt that never exits, 2 an exit at layer K

    fast_layers: int = setting(6, at_least=1, integer=True)
    exit_threshold: float = setting(0.8, at_least=0.0, at_most=1.0)
    min_exit_layer: int = 1
    adaptive: bool = setting(True, choices=(True, False), kw_only=True)
    step_costs: tuple[float, ...] | None = dataclasses.field(default=None, kw_only=True)
    probe_every: int = setting(16, at_least=1, integer=True, kw_only=True)

    def check(self) -> None:
        if not isinstance(self.min_exit_layer, int) or not 1 <= self.min_exit_layer <= self.fast_layers:
            raise ValueError(
                f"m2r2-exit min_exit_layer must be an integer in [1, fast_layers={self.fast_layers}], got {self.min_exit_layer!r}"
            )
        if self.step_costs is not None and (len(self.step_costs) != 3 or min(self.step_costs) <= 0):
            raise ValueError("m2r2-exit step_costs must be 3 positive times: a plain step, a failed attempt, an exit at layer K")

    def validate(self, cfg: ModelConfig, method_params: Any) -> None:
        _check_fast("m2r2-exit", self.fast_layers, cfg, method_params)
        if "arla" not in method_params:
            raise ValueError("m2r2-exit needs method_params['arla'] (the trained exit predictor; see `eej train m2r2`)")
        have = np.shape(method_params["arla"]["bias"])[0]
        if have < self.fast_layers:
            raise ValueError(f"m2r2-exit ARLA covers {have} fast layers, the settings ask for {self.fast_layers}")

    def prefill(self, params, method_params, tokens, prompt_lens, cache, cfg):
        logits, cache = full_prefill(params, tokens, prompt_lens, cache, cfg)
        n, k = cfg.num_layers, self.fast_layers  # before measuring: costs in layers (exit + propagation ~ 1 more)
        return logits, cache, {"economics": ExitEconomics.start(2, self.step_costs or (n, n + k, k + 1))}

    def _attempts(self, econ: ExitEconomics) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(attempt the fast stream this step, whether it is a probe, whether the rule says it pays) from the
        rates and costs."""
        if not self.adaptive:
            return jnp.asarray(True), jnp.asarray(False), jnp.asarray(True)
        plain, fail, exit_k = econ.costs[0], econ.costs[1], econ.costs[2]
        p, depth = econ.rate[0], econ.rate[1] * self.fast_layers
        exit_cost = exit_k - (self.fast_layers - depth) * (fail - plain) / self.fast_layers
        pays = p * exit_cost + (1 - p) * fail < plain
        due = ~pays & econ.probe_due(self.probe_every)
        return jnp.where(econ.force >= 0, econ.force > 0, pays | due), due, pays

    def step(self, s: StepInputs) -> StepResult:
        params, method_params, cfg, num_fast = s.params, s.method_params, s.cfg, self.fast_layers
        econ: ExitEconomics = s.method_state["economics"]
        positions = s.positions
        x0 = embed(params, s.pending[:, None], cfg)
        attempt, probe, pays = self._attempts(econ)

        def fast_stream(cache):
            x = x0
            trajectory = jnp.zeros((s.batch, num_fast, cfg.hidden_size), x.dtype)
            exited = jnp.zeros((), bool)
            exit_layer = jnp.asarray(num_fast, jnp.int32)
            for j in range(num_fast):
                # A batch-level decision: the layer's compute is skipped for real once the batch has exited.
                x, cache = run_layer_if(~exited, method_params["fast_layers"][j], j, x, cache, positions, cfg)
                trajectory = trajectory.at[:, j].set(x[:, 0])
                if j + 1 >= self.min_exit_layer:
                    p_exit = jax.nn.sigmoid(arla_logits(method_params["arla"], trajectory[:, : j + 1], cfg)[:, j])
                    fire = ~exited & jnp.all((p_exit >= self.exit_threshold) | ~s.active)
                    fire = jnp.where(econ.force == 1, False, jnp.where(econ.force == 2, j + 1 == num_fast, fire))
                    exit_layer = jnp.where(fire, j + 1, exit_layer)
                    exited = exited | fire
            return cache, (x, exited, exit_layer)

        def exit_path(cache, x, exit_layer):
            cache = propagate_kv(params, x, cache, positions, cfg, exit_layer)
            return cache, fast_head_logits(method_params, x[:, 0], params["lm_head"], cfg)

        def slow_path(cache, x, exit_layer):
            h, cache = run_layers(params, x0, cache, positions, cfg)
            return cache, logits_from_hidden(params, h[:, 0], cfg)

        def attempted(cache):
            cache, (x, exited, exit_layer) = fast_stream(cache)
            cache, logits = cond_in_place(exited, exit_path, slow_path, cache, x, exit_layer)
            return cache, (logits, exited, exit_layer)

        def plain(cache):
            cache, logits = slow_path(cache, x0, 0)
            return cache, (logits, jnp.asarray(False), jnp.asarray(0, jnp.int32))

        # A step that does not attempt branches once (XLA:GPU reads every predicate back to the host).
        cache, (logits, exited, exit_layer) = cond_in_place(attempt, attempted, plain, s.cache)
        econ = econ.observe(jnp.stack([exited, exit_layer / num_fast]).astype(jnp.float32),
                            jnp.stack([attempt, exited]).astype(jnp.float32), attempt, probe, pays)
        layers = jnp.where(exited, exit_layer, jnp.where(attempt, num_fast, 0) + cfg.num_layers)
        return StepResult.one_token(s.sample(logits), cache, {"economics": econ},
                                    forwards=jnp.where(exited, 0, 1), layers=layers, exited=exited,
                                    checked=attempt, logits=logits)


# ----------------------------------------------------------------------------- registration


@dataclasses.dataclass(frozen=True)
class M2R2SpecSettings:
    """`configs/<model>/m2r2-spec.yaml` presets.

    adapter: the trained artifact (relative paths: from the repository root); it fixes fast_layers.
    exit_threshold, max_draft_steps, adaptive, probe_every: see `M2R2Spec`.
    draft_vocab_size: V' of the reduced draft head (the artifact's most frequent tokens); 0 = full head.
    """

    adapter: str
    exit_threshold: float = setting(0.5, at_least=0.0, at_most=1.0)
    max_draft_steps: int = setting(5, at_least=1, integer=True)
    draft_vocab_size: int = setting(0, at_least=0, integer=True)
    adaptive: bool = setting(True, choices=(True, False))
    probe_every: int = setting(16, at_least=1, integer=True)


@dataclasses.dataclass(frozen=True)
class M2R2ExitSettings:
    """`configs/<model>/m2r2-exit.yaml` presets (adapter as in M2R2SpecSettings; the others: see `M2R2Exit`)."""

    adapter: str
    exit_threshold: float = setting(0.8, at_least=0.0, at_most=1.0)
    min_exit_layer: int = setting(1, at_least=1, integer=True)
    adaptive: bool = setting(True, choices=(True, False))
    probe_every: int = setting(16, at_least=1, integer=True)


def load_fast_stream(model: Model, adapter: str, draft_vocab_size: int = 0) -> tuple[int, dict]:
    """A trained m2r2 artifact (`eej train m2r2`) for `model` -> (K fast layers, method_params).

    method_params hold the fast layers (adapters merged), the fast norm, ARLA and, if draft_vocab_size > 0,
    a reduced draft head over the artifact's most frequent answer tokens.
    """
    cfg = model.cfg
    arrays, header = load_artifact(resolve_path(adapter), "m2r2", cfg)
    settings = header.get("settings", {})
    num_fast = int(settings["fast_layers"])
    lora = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), arrays["lora"])
    layers = fast_layers_from_lora(model.params, lora, num_fast, float(settings.get("lora_scale", 1.0)))
    out: dict[str, Any] = {
        "fast_layers": jax.tree.map(lambda a: jnp.asarray(a, cfg.jnp_dtype), layers),
        "norm": jnp.asarray(arrays["norm"], cfg.jnp_dtype),
        "arla": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), arrays["arla"]),
    }
    if draft_vocab_size:
        out.update(head_from_ranking(model.params, arrays.get("vocab_rank"), draft_vocab_size, adapter))
    return num_fast, out


def load_spec(model: Model, s: M2R2SpecSettings) -> tuple[M2R2Spec, dict]:
    num_fast, method_params = load_fast_stream(model, s.adapter, s.draft_vocab_size)
    method_params.pop("arla")
    return M2R2Spec(num_fast, s.exit_threshold, s.max_draft_steps, adaptive=s.adaptive, probe_every=s.probe_every), method_params


def load_exit(model: Model, s: M2R2ExitSettings) -> tuple[M2R2Exit, dict]:
    num_fast, method_params = load_fast_stream(model, s.adapter)
    return M2R2Exit(num_fast, s.exit_threshold, s.min_exit_layer, adaptive=s.adaptive, probe_every=s.probe_every), method_params


def random_method_params(
    model: Model, seed: int, num_fast: int, rank: int = 4, adapter_scale: float = 0.5, reduced: bool = True,
    arla_scale: float = 1.0, targets: Sequence[str] | None = None,
) -> dict:
    """Untrained (random, non-zero) adapters, fast norm, ARLA and a half-vocabulary draft head (tests)."""
    cfg = model.cfg
    lora = init_lora(jax.random.PRNGKey(seed), cfg, rank, targets or None, num_layers=num_fast)
    rng = np.random.default_rng(seed)
    lora = {n: {"a": ab["a"], "b": jnp.asarray(rng.standard_normal(ab["b"].shape) * adapter_scale / rank, jnp.float32)}
            for n, ab in lora.items()}
    out: dict[str, Any] = {
        "fast_layers": jax.tree.map(lambda a: a.astype(cfg.jnp_dtype), fast_layers_from_lora(model.params, lora, num_fast)),
        "norm": jnp.asarray(model.params["final_norm"]),
        "arla": jax.tree.map(jnp.asarray, init_arla(cfg, num_fast, dim=8, hidden=16, seed=seed, scale=arla_scale)),
    }
    if reduced:
        out.update(reduced_head(model.params, np.sort(rng.permutation(cfg.vocab_size)[: max(1, cfg.vocab_size // 2)])))
    return out


def random_spec(model: Model, seed: int, **overrides: Any) -> tuple[M2R2Spec, dict]:
    """An untrained M2R2Spec (tests): adaptive with made-up step costs (`TEST_STEP_COSTS`), so no calibration runs."""
    fields = dict(fast_layers=min(2, model.cfg.num_layers), exit_threshold=0.02, max_draft_steps=4)
    fields.update(overrides)
    fields.setdefault("step_costs", TEST_STEP_COSTS[: fields["max_draft_steps"] + 1])
    method_params = random_method_params(model, seed, fields["fast_layers"])
    method_params.pop("arla")
    return M2R2Spec(**fields), method_params


def random_exit(model: Model, seed: int, **overrides: Any) -> tuple[M2R2Exit, dict]:
    """An untrained M2R2Exit (tests): adaptive with step costs in layers (no calibration runs)."""
    fields = dict(fast_layers=min(3, model.cfg.num_layers), exit_threshold=0.5, min_exit_layer=1)
    fields.update(overrides)
    n, k = model.cfg.num_layers, fields["fast_layers"]
    fields.setdefault("step_costs", (float(n), float(n + k), float(k + 1)))
    method_params = random_method_params(model, seed, fields["fast_layers"], reduced=False, arla_scale=3.0)
    return M2R2Exit(**fields), method_params


register_method("m2r2-spec", settings=M2R2SpecSettings, load=load_spec, random=random_spec)
register_method("m2r2-exit", settings=M2R2ExitSettings, load=load_exit, random=random_exit)
