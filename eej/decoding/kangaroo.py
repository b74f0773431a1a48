"""Kangaroo: self-speculative decoding with a double early exit (Liu et al. 2024, arXiv 2404.18911).

Draft model = the target's first `exit_layer` layers + a small trained adapter + an LM head. The
adapter is one attention-only Llama block: input RMSNorm, self-attention with RoPE, residual, then a
final RMSNorm (no MLP). Each step:

1. Draft: the pending token, then each new draft, goes through the shallow layers [0, l) (their KV
   is written to the model cache and kept: verification never recomputes it), then the adapter
   (its own one-layer KV cache) and the draft head. A row stops after `max_draft_steps` drafts or
   after a draft whose top-1 probability is below `exit_threshold` (the second early exit).
2. Verify: layers [l, N) run once over the saved layer-l hidden states of [pending, drafts...], then
   the full LM head; `eej.decoding.verify` accepts the longest agreeing prefix plus one token
   (greedy), or applies lossless speculative sampling.
3. Roll back: the model cache and the adapter cache are set to the committed length.

The last draft also goes through the shallow layers and the adapter before verification, so the
adapter cache never misses an accepted token (the reference code instead re-feeds it next round).

Beyond the paper: batches with per-row draft lengths, lossless sampling (q = the warped draft
distribution each draft was drawn from), and a cheap draft head — a frequency-ranked subset of the
vocabulary (`draft_head` [D, V'] + `draft_ids` [V'] in method_params); verification keeps the full
head, so the output is unchanged.

method_params = {"adapter": {"attn_norm": [D], "wq": [D, Hq*Dh], "wk": [D, Hkv*Dh],
                             "wv": [D, Hkv*Dh], "wo": [Hq*Dh, D], "norm": [D]},
                 ("draft_head": [D, V'], "draft_ids": [V'] int32)}
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from eej.config import ModelConfig, SamplingConfig
from eej.decoding.methods import MethodError, register_method
from eej.decoding.speculation import accept, draft_loop, rollback
from eej.decoding.strategy import StepResult, Strategy, last_token_logits, prompt_positions
from eej.model.cache import KVCache, init_cache
from eej.model.transformer import Params, attention_block, embed, linear, logits_from_hidden, rms_norm, run_layers

ADAPTER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "norm")


# ----------------------------------------------------------------------------- the adapter


def adapter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"attn_norm": (d,), "wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "norm": (d,)}


def init_adapter(cfg: ModelConfig, seed: int = 0, scale: float = 0.02, norm: Any = None) -> dict[str, np.ndarray]:
    """A random adapter (float32 numpy): projections ~ N(0, scale), norms 1 (or `norm` [D] for the final one).

    Starting the final norm from the model's own final norm and the output projection small makes the
    untrained draft close to the logit lens at the exit layer.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in adapter_shapes(cfg).items():
        if name in ("attn_norm", "norm"):
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    if norm is not None:
        out["norm"] = np.asarray(norm, np.float32).copy()
    return out


def adapter_forward(
    adapter: dict[str, jax.Array],
    hidden: jax.Array,
    cache: KVCache,
    positions: jax.Array,
    cfg: ModelConfig,
    kv_limit: int | None = None,
) -> tuple[jax.Array, KVCache]:
    """Adapter over layer-l hidden states [B, T, D] -> (final-normed states [B, T, D], its 1-layer cache)."""
    x, k, v = attention_block(adapter, hidden, cache.k[0], cache.v[0], positions, cfg, kv_limit)
    return rms_norm(x, adapter["norm"], cfg.rms_eps), cache.replace(k=(k,), v=(v,))


def draft_head(params: Params, method_params: dict) -> tuple[jax.Array, jax.Array | None]:
    """The draft's LM head [D, V'] and its token ids [V'] (None: the full head)."""
    if "draft_head" in method_params:
        return method_params["draft_head"], method_params["draft_ids"]
    return params["lm_head"], None


def check_draft_head(method: str, cfg: ModelConfig, method_params: dict) -> None:
    """ValueError unless method_params hold both or neither of draft_head [D, V'] and draft_ids [V']."""
    if ("draft_head" in method_params) != ("draft_ids" in method_params):
        raise ValueError(f"{method} method_params need both draft_head and draft_ids, or neither")
    if "draft_head" in method_params:
        head, ids = np.shape(method_params["draft_head"]), np.shape(method_params["draft_ids"])
        if len(ids) != 1 or head != (cfg.hidden_size, ids[0]) or not 0 < ids[0] <= cfg.vocab_size:
            raise ValueError(f"{method} draft_head {head} and draft_ids {ids} must be [D={cfg.hidden_size}, V'] and [V']")


def reduced_head(params: Params, token_ids: Any) -> dict[str, jax.Array]:
    """method_params entries for a draft head restricted to `token_ids` [V'] (a column slice of the LM head)."""
    ids = jnp.asarray(np.asarray(token_ids, np.int32))
    return {"draft_head": jnp.take(params["lm_head"], ids, axis=1), "draft_ids": ids}


# ----------------------------------------------------------------------------- the strategy


@dataclasses.dataclass(frozen=True)
class Kangaroo(Strategy):
    """Kangaroo's static settings; the adapter (and draft head) travel in method_params.

    exit_layer: l, the number of target layers the draft shares (0 <= l < N).
    exit_threshold: a row stops drafting after a draft whose top-1 probability is below this.
    max_draft_steps: the most drafts per step (K); a step commits at most K + 1 tokens.
    """

    name: ClassVar[str] = "kangaroo"
    lossless: ClassVar[bool] = True
    batch_invariant: ClassVar[bool] = True

    exit_layer: int = 2
    exit_threshold: float = 0.6
    max_draft_steps: int = 6

    def __post_init__(self) -> None:
        if not isinstance(self.exit_layer, int) or self.exit_layer < 0:
            raise ValueError(f"kangaroo exit_layer must be an integer >= 0, got {self.exit_layer!r}")
        if not 0.0 <= float(self.exit_threshold) <= 1.0:
            raise ValueError(f"kangaroo exit_threshold must be in [0, 1], got {self.exit_threshold}")
        if not isinstance(self.max_draft_steps, int) or self.max_draft_steps < 1:
            raise ValueError(f"kangaroo max_draft_steps must be an integer >= 1, got {self.max_draft_steps!r}")

    @property
    def max_step_tokens(self) -> int:
        return self.max_draft_steps + 1

    def validate(self, cfg: ModelConfig, method_params: Any) -> None:
        if self.exit_layer >= cfg.num_layers:
            raise ValueError(
                f"kangaroo exit_layer {self.exit_layer} must be below the model's {cfg.num_layers} layers"
            )
        if not isinstance(method_params, dict) or "adapter" not in method_params:
            raise ValueError("kangaroo needs method_params {'adapter': ...} (a trained adapter; see `eej train kangaroo`)")
        adapter = method_params["adapter"]
        for name, shape in adapter_shapes(cfg).items():
            got = tuple(np.shape(adapter.get(name))) if name in adapter else None
            if got != shape:
                raise ValueError(f"kangaroo adapter {name} has shape {got}, the model needs {shape}")
        check_draft_head("kangaroo", cfg, method_params)

    def prefill(self, params, method_params, tokens, prompt_lens, cache, cfg):
        """Prompt through layers [0, l), the adapter and layers [l, N); both caches end at `prompt_lens`."""
        padded = tokens.shape[1]
        positions = prompt_positions(tokens)
        hidden, cache = run_layers(params, embed(params, tokens, cfg), cache, positions, cfg, 0, self.exit_layer, kv_limit=padded)
        adapter_cache = init_cache(cfg, tokens.shape[0], cache.capacity, num_layers=1)
        _, adapter_cache = adapter_forward(method_params["adapter"], hidden, adapter_cache, positions, cfg, kv_limit=padded)
        hidden, cache = run_layers(params, hidden, cache, positions, cfg, self.exit_layer, kv_limit=padded)
        logits = last_token_logits(params, hidden, prompt_lens, cfg)
        return logits, cache.with_lengths(prompt_lens), adapter_cache.with_lengths(prompt_lens)

    def _shallow(self, params, method_params, cache, adapter_cache, token, positions, cfg):
        """One token per row [B] at `positions` [B, 1] through layers [0, l) and the adapter."""
        hidden, cache = run_layers(params, embed(params, token[:, None], cfg), cache, positions, cfg, 0, self.exit_layer)
        drafted, adapter_cache = adapter_forward(method_params["adapter"], hidden, adapter_cache, positions, cfg)
        return hidden[:, 0], drafted[:, 0], cache, adapter_cache

    def step(
        self,
        params: Params,
        method_params: Any,
        cache: KVCache,
        method_state: Any,
        pending: jax.Array,
        key: jax.Array,
        sampling: SamplingConfig,
        cfg: ModelConfig,
    ) -> StepResult:
        batch, k = pending.shape[0], self.max_draft_steps
        start = cache.lengths
        head, ids = draft_head(params, method_params)
        hidden0 = jnp.zeros((batch, k + 1, cfg.hidden_size), cfg.jnp_dtype)

        def draft_fn(carry, token, i):
            cache, adapter_cache, hidden = carry
            h, drafted, cache, adapter_cache = self._shallow(
                params, method_params, cache, adapter_cache, token, (start + i)[:, None], cfg
            )
            hidden = lax.dynamic_update_slice(hidden, h[:, None], (0, i, 0))
            return (cache, adapter_cache, hidden), linear(drafted, head)

        draft_key, verify_key = jax.random.split(key)
        (cache, adapter_cache, hidden), drafts = draft_loop(
            draft_fn, (cache, method_state, hidden0), pending, draft_key, sampling,
            max_steps=k, exit_threshold=self.exit_threshold, vocab_size=cfg.vocab_size, vocab_ids=ids,
        )
        # The last iteration's draft still needs its shallow layers (for verification) and adapter KV.
        h, _, cache, adapter_cache = self._shallow(
            params, method_params, cache, adapter_cache, drafts.last, (start + drafts.steps)[:, None], cfg
        )
        hidden = lax.dynamic_update_slice(hidden, h[:, None], (0, drafts.steps, 0))

        positions = start[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None]
        deep, cache = run_layers(params, hidden, cache, positions, cfg, self.exit_layer)
        tokens, counts = accept(drafts, logits_from_hidden(params, deep, cfg), verify_key, sampling)
        cache, adapter_cache = rollback((cache, adapter_cache), start + counts)
        shallow_passes = (drafts.steps + 1).astype(jnp.float32)
        return StepResult(
            tokens=tokens,
            counts=counts,
            cache=cache,
            method_state=adapter_cache,
            forwards=jnp.ones((batch,), jnp.int32),
            layers=jnp.full((batch,), shallow_passes * self.exit_layer + (cfg.num_layers - self.exit_layer)),
        )


# ----------------------------------------------------------------------------- building from settings


@dataclasses.dataclass(frozen=True)
class KangarooSettings:
    """What `configs/<model>/kangaroo.yaml` presets hold.

    adapter: path of the trained artifact (relative paths: from the repository root).
    draft_vocab_size: V' of the reduced draft head (the artifact's most frequent tokens); 0 = full head.
    """

    adapter: str
    exit_layer: int
    exit_threshold: float = 0.6
    max_draft_steps: int = 6
    draft_vocab_size: int = 0


def load_kangaroo(model, settings: KangarooSettings) -> tuple[Kangaroo, dict]:
    """(strategy, method_params) from a trained artifact; checks it fits the model and the settings."""
    from eej.presets import resolve_path
    from eej.train.artifacts import load_artifact

    arrays, header = load_artifact(resolve_path(settings.adapter), "kangaroo", model.cfg)
    trained_layer = header.get("settings", {}).get("exit_layer")
    if trained_layer != settings.exit_layer:
        raise MethodError(
            f"{settings.adapter} was trained for exit_layer {trained_layer}, the settings ask for {settings.exit_layer}"
        )
    method_params: dict[str, Any] = {"adapter": {k: jnp.asarray(arrays["adapter"][k], model.cfg.jnp_dtype) for k in ADAPTER_KEYS}}
    if settings.draft_vocab_size:
        ranking = arrays.get("vocab_rank")
        if ranking is None or settings.draft_vocab_size > len(ranking):
            have = 0 if ranking is None else len(ranking)
            raise MethodError(f"draft_vocab_size {settings.draft_vocab_size} exceeds the {have} ranked tokens in {settings.adapter}")
        method_params.update(reduced_head(model.params, ranking[: settings.draft_vocab_size]))
    strategy = Kangaroo(settings.exit_layer, settings.exit_threshold, settings.max_draft_steps)
    return strategy, method_params


def _build(model, config: str | None) -> tuple[Strategy, Any]:
    from eej.presets import from_settings, method_settings

    settings = from_settings(KangarooSettings, method_settings(model.name, "kangaroo", config), "kangaroo settings")
    return load_kangaroo(model, settings)


def random_kangaroo(model, seed: int, **overrides: Any) -> tuple[Kangaroo, dict]:
    """An untrained Kangaroo for any model (tests): random adapter, reduced draft head of half the vocabulary."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    fields = dict(exit_layer=min(1, cfg.num_layers - 1), exit_threshold=0.02, max_draft_steps=4)
    fields.update(overrides)
    adapter = init_adapter(cfg, seed, scale=0.1, norm=np.asarray(model.params["final_norm"]))
    method_params: dict[str, Any] = {"adapter": {k: jnp.asarray(v, cfg.jnp_dtype) for k, v in adapter.items()}}
    method_params.update(reduced_head(model.params, np.sort(rng.permutation(cfg.vocab_size)[: max(1, cfg.vocab_size // 2)])))
    return Kangaroo(**fields), method_params


register_method("kangaroo", _build, random_kangaroo)
