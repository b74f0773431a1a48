"""The shared machinery of self-speculative decoding (Kangaroo, M2R2's self-speculation) and of the
drafters that early-exit methods borrow (SpecEE's speculative tokens).

A self-speculative step is: draft up to `max_steps` tokens with a cheap drafter, each row stopping
on its own when the drafter's confidence drops; verify them with the target model in one pass;
accept with `eej.decoding.verify`; roll every cache back to the committed length.

- `draft_loop`: the compiled drafting loop. A drafter is a function
  `draft_fn(carry, tokens [B], i) -> (carry, logits [B, V'])` that feeds token i of every row (the
  pending token, then the previous draft) and returns the draft logits for the next position, over
  the full vocabulary or a reduced draft vocabulary `vocab_ids` [V']. The loop samples (or takes
  the argmax), records the distribution q each draft was drawn from (so that speculative sampling
  stays lossless), and keeps per-row stop decisions with static shapes.
- `accept`: the shared acceptance rule applied to a `DraftResult`.
- `rollback`: every KV cache in a pytree set to the committed lengths.
- Drafting pieces: the draft head with a reduced vocabulary (`draft_head`, `reduced_head`,
  `head_from_ranking`), Kangaroo's attention-only adapter block (`adapter_forward`, `init_adapter`,
  `check_adapter`, `load_adapter`), and the prefill that taps the residual entering layer l
  (`prefill_tapped`), which a drafter reading layer l needs for the prompt.

Batching: all rows run every iteration (static shapes); the loop continues while any row still
drafts. A row that has stopped keeps computing throw-away drafts at positions past its own, which
later verification and rollback ignore.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from eej.config import ModelConfig, SamplingConfig
from eej.decoding.methods import MethodError
from eej.decoding.sampling import probabilities, race_sample, sample, sample_from_probs
from eej.decoding.strategy import last_token_logits, prompt_positions
from eej.decoding.verify import verify_sampling, verify_tokens
from eej.model.cache import KVCache
from eej.model.packed import take_columns
from eej.model.transformer import Params, attention_block, embed, rms_norm, run_layers
from eej.settings import resolve_path
from eej.weights.artifacts import load_artifact
from eej.weights.registry import Model

DraftFn = Callable[[Any, jax.Array, jax.Array], tuple[Any, jax.Array]]


@struct.dataclass
class DraftResult:
    """What a drafting loop produced for B rows with room for K drafts.

    tokens: [B, K] int32 drafts; only the first `num_drafted[b]` of row b are real.
    num_drafted: [B] int32 in [0, K] (0 only when the loop was asked for no drafts).
    probs: [B, K, V] float32 distributions the drafts were drawn from (None when greedy or coupled).
    steps: int32 scalar: the most drafts a row made (= max of num_drafted; the loop's iterations, but for a step whose
      first drafts were dropped); the int 0 where no loop was traced.
    confident: [B] bool, whether each row's first draft reached the loop's `exit_threshold` (False where none was
      made) — None unless the loop was given `then`.
    first_logits: [B, V'] float32, the first draft's logits — None unless the loop was given `then`.
    dropped: bool scalar, the first drafts were made and then dropped (`then` asked for none) — False unless the
      loop was given `then`.
    asked: int32 scalar, how many drafts the step asked for in the end (`then`'s answer) — None without `then`.
    """

    tokens: jax.Array
    num_drafted: jax.Array
    probs: jax.Array | None
    steps: jax.Array
    confident: jax.Array | None = None
    first_logits: jax.Array | None = None
    dropped: jax.Array | bool = False
    asked: jax.Array | int | None = None

    def last(self, pending: jax.Array) -> jax.Array:
        """[B] the token of the last iteration's output (each row's last real draft if it drafted `steps`),
        or `pending` [B] when nothing was drafted."""
        last = lax.dynamic_index_in_dim(self.tokens, jnp.maximum(self.steps - 1, 0), axis=1, keepdims=False)
        return jnp.where(self.steps > 0, last, pending)

    def first(self, n: int) -> "DraftResult":
        """The first n (static) draft slots: what a verification of n + 1 tokens judges."""
        return self.replace(tokens=self.tokens[:, :n], num_drafted=jnp.minimum(self.num_drafted, n),
                            probs=None if self.probs is None else self.probs[:, :n], steps=jnp.minimum(self.steps, n))


def draft_loop(
    draft_fn: DraftFn,
    carry: Any,
    pending: jax.Array,
    key: jax.Array,
    sampling: SamplingConfig,
    *,
    max_steps: int,
    exit_threshold: float,
    vocab_size: int,
    vocab_ids: jax.Array | None = None,
    num_steps: jax.Array | int | None = None,
    keys: jax.Array | None = None,
    then: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[Any, DraftResult]:
    """Draft up to `num_steps` (<= max_steps; default max_steps; one for all rows or [B]) tokens per row after `pending` [B].

    Row b stops after `num_steps` drafts, or after a draft whose top-1 draft probability (softmax of
    the draft logits at temperature 1, over the draft vocabulary) is below `exit_threshold` — that
    draft is kept. num_steps may be traced (an adaptive draft length); 0 drafts nothing.

    Args:
      draft_fn: see the module docstring; called with iteration index i (int32 scalar) for the
        token at offset i after the committed tokens.
      carry: the drafter's state (caches, buffers), threaded through every call.
      vocab_size: V, the full vocabulary (the size of the returned `probs`).
      vocab_ids: [V'] int32 token ids of the draft logits' columns; None when V' = V.
      keys: [B, >= max_steps] uint32 the keys of the drafted positions (`StepInputs.token_keys`): coupled sampling
        draws draft i with keys[:, i], as the target's draw for that position will be.
      then: after the first draft, `then(confident [B] bool) -> int32 scalar`: how many drafts the rows that drafted
        make in all, given which first drafts reached `exit_threshold` (a gated first draft: eej.decoding.adaptive);
        0 drops the first drafts (`DraftResult.dropped`, `first_logits`: what a probe scores). None: `num_steps`.
    Returns:
      (carry after the last call, DraftResult).
    """
    batch = pending.shape[0]
    greedy = sampling.greedy
    coupled = sampling.coupled and not greedy
    if coupled and keys is None:
        raise ValueError("draft_loop under coupled sampling needs the drafted positions' keys")
    tokens0 = jnp.zeros((batch, max_steps), jnp.int32)
    probs0 = None if greedy or coupled else jnp.zeros((batch, max_steps, vocab_size), jnp.float32)
    if isinstance(num_steps, int) and num_steps <= 0:  # nothing to draft, and no loop traced: `steps` is the int 0
        return carry, DraftResult(tokens=tokens0, num_drafted=jnp.zeros((batch,), jnp.int32), probs=probs0, steps=0)

    def to_full(q: jax.Array) -> jax.Array:
        if vocab_ids is None:
            return q
        return jnp.zeros((batch, vocab_size), q.dtype).at[:, vocab_ids].set(q)

    def body(state):
        i, token, carry, tokens, probs, num, active, limit, first = state
        carry, logits = draft_fn(carry, token, i)
        logits = logits.astype(jnp.float32)
        confidence = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
        if then is not None:  # the first draft decides how many follow (0: none is kept)
            sure = active & (confidence >= exit_threshold)
            limit = jnp.where(i == 0, jnp.where(limit > 0, jnp.minimum(then(sure), max_steps), 0), limit)
            first = jax.tree.map(lambda old, new: jnp.where(i == 0, new, old), first, (sure, logits))
            active = active & (limit > 0)
        if coupled:
            draft = race_sample(logits, lax.dynamic_index_in_dim(keys, i, axis=1, keepdims=False), sampling, vocab_ids,
                                vocab_size)
        else:
            if greedy:
                choice = jnp.argmax(logits, axis=-1)
            else:
                q = probabilities(logits, sampling)
                choice = sample_from_probs(q, jax.random.fold_in(key, i))
                probs = lax.dynamic_update_slice(probs, to_full(q)[:, None], (0, i, 0))
            draft = (choice if vocab_ids is None else vocab_ids[choice]).astype(jnp.int32)
        tokens = lax.dynamic_update_slice(tokens, draft[:, None], (0, i))
        num = num + active.astype(jnp.int32)
        active = active & (confidence >= exit_threshold) & (i + 1 < limit)
        return i + 1, draft, carry, tokens, probs, num, active, limit, first

    limit = jnp.broadcast_to(jnp.asarray(max_steps if num_steps is None else jnp.minimum(num_steps, max_steps),
                                         jnp.int32), (batch,))
    width = vocab_size if vocab_ids is None else vocab_ids.shape[0]
    first = None if then is None else (jnp.zeros((batch,), bool), jnp.zeros((batch, width), jnp.float32))
    state = (jnp.zeros((), jnp.int32), pending, carry, tokens0, probs0, jnp.zeros((batch,), jnp.int32), limit > 0, limit,
             first)
    ran, _, carry, tokens, probs, num, _, limit, first = lax.while_loop(lambda s: jnp.any(s[6]), body, state)
    if then is None:
        return carry, DraftResult(tokens=tokens, num_drafted=num, probs=probs, steps=ran)
    steps = jnp.max(num)
    return carry, DraftResult(tokens=tokens, num_drafted=num, probs=probs, steps=steps, confident=first[0],
                              first_logits=first[1], dropped=(ran > 0) & (steps == 0), asked=jnp.max(limit))


def accept(drafts: DraftResult, target_logits: jax.Array, key: jax.Array, sampling: SamplingConfig,
           keys: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Verify drafts against target logits [B, K+1, V] -> (tokens [B, K+1], counts [B]) (see eej.decoding.verify);
    keys [B, >= K+1] uint32: the verified positions' (`StepInputs.token_keys`), for coupled sampling.

    K = 0 (nothing drafted: a plain step) samples the one token from the target."""
    width = target_logits.shape[1]
    keys = None if keys is None else keys[:, :width]
    if drafts.tokens.shape[1] == 0:
        token = sample(target_logits[:, 0], key, sampling, None if keys is None else keys[:, 0])
        return token[:, None], jnp.ones(target_logits.shape[:1], jnp.int32)
    if sampling.greedy or sampling.coupled:
        return verify_tokens(drafts.tokens, drafts.num_drafted, sample(target_logits, key, sampling, keys))
    return verify_sampling(drafts.tokens, drafts.num_drafted, drafts.probs, target_logits, key, sampling)


def rollback(caches: Any, lengths: jax.Array) -> Any:
    """Every `KVCache` in the pytree `caches` with `lengths` [B] committed tokens (data stays; see cache.py)."""
    return jax.tree.map(
        lambda c: c.with_lengths(lengths) if isinstance(c, KVCache) else c, caches, is_leaf=lambda c: isinstance(c, KVCache)
    )


# ----------------------------------------------------------------------------- draft heads


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
    return {"draft_head": take_columns(params["lm_head"], ids), "draft_ids": ids}


def head_from_ranking(params: Params, ranking: Any, size: int, where: str) -> dict[str, jax.Array]:
    """A reduced draft head of the `size` most frequent tokens of an artifact's `vocab_rank` (read from `where`)."""
    if ranking is None or size > len(ranking):
        have = 0 if ranking is None else len(ranking)
        raise MethodError(f"draft_vocab_size {size} exceeds the {have} ranked tokens in {where}")
    return reduced_head(params, ranking[:size])


# ----------------------------------------------------------------------------- Kangaroo's adapter block

ADAPTER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "norm")


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


def check_adapter(method: str, cfg: ModelConfig, exit_layer: int, method_params: Any) -> None:
    """ValueError unless `method_params` hold an adapter for layer `exit_layer` of `cfg` (and a well-formed
    draft head, if any), naming the first weight missing or shaped unlike `adapter_shapes(cfg)`."""
    if exit_layer >= cfg.num_layers:
        raise ValueError(f"{method} exit_layer {exit_layer} must be below the model's {cfg.num_layers} layers")
    if not isinstance(method_params, dict) or "adapter" not in method_params:
        raise ValueError(f"{method} needs method_params {{'adapter': ...}} (a trained adapter; see `eej train kangaroo`)")
    adapter = method_params["adapter"]
    for name, shape in adapter_shapes(cfg).items():
        got = tuple(np.shape(adapter.get(name))) if name in adapter else None
        if got != shape:
            raise ValueError(f"{method} adapter {name} has shape {got}, the model needs {shape}")
    check_draft_head(method, cfg, method_params)


def adapter_forward(
    adapter: dict[str, jax.Array],
    hidden: jax.Array,
    cache: KVCache,
    positions: jax.Array,
    cfg: ModelConfig,
    kv_limit: int | None = None,
) -> tuple[jax.Array, KVCache]:
    """Adapter over layer-l hidden states [B, T, D] -> (final-normed states [B, T, D], its 1-layer cache)."""
    x, k, v = attention_block(adapter, hidden, *cache.layer(0), positions, cfg, kv_limit)
    return rms_norm(x, adapter["norm"], cfg.rms_eps), cache.set_layer(0, k, v)


def load_adapter(model: Model, path: str, exit_layer: int, draft_vocab_size: int = 0) -> dict[str, Any]:
    """A trained Kangaroo adapter (`eej train kangaroo`) as method_params {"adapter", (draft head)}.

    Checks that it was made for `model` and for `exit_layer`; draft_vocab_size > 0 adds a reduced draft
    head over the artifact's most frequent answer tokens.
    """
    arrays, header = load_artifact(resolve_path(path), "kangaroo", model.cfg)
    trained_layer = header.get("settings", {}).get("exit_layer")
    if trained_layer != exit_layer:
        raise MethodError(f"{path} was trained for exit_layer {trained_layer}, the settings ask for {exit_layer}")
    method_params: dict[str, Any] = {"adapter": {k: jnp.asarray(arrays["adapter"][k], model.cfg.jnp_dtype) for k in ADAPTER_KEYS}}
    if draft_vocab_size:
        method_params.update(head_from_ranking(model.params, arrays.get("vocab_rank"), draft_vocab_size, path))
    return method_params


def random_adapter(model: Model, seed: int) -> dict[str, Any]:
    """An untrained adapter for any model (tests), with a reduced draft head over a random half of the vocabulary."""
    cfg = model.cfg
    adapter = init_adapter(cfg, seed, scale=0.1, norm=np.asarray(model.params["final_norm"]))
    method_params: dict[str, Any] = {"adapter": {k: jnp.asarray(v, cfg.jnp_dtype) for k, v in adapter.items()}}
    rng = np.random.default_rng(seed)
    method_params.update(reduced_head(model.params, np.sort(rng.permutation(cfg.vocab_size)[: max(1, cfg.vocab_size // 2)])))
    return method_params


# ----------------------------------------------------------------------------- the prefill tap


def prefill_tapped(
    params: Params, tokens: jax.Array, prompt_lens: jax.Array, cache: KVCache, cfg: ModelConfig, tap_layer: int
) -> tuple[jax.Array, KVCache, jax.Array, jax.Array]:
    """The whole model over right-padded prompts [B, P], keeping the residual entering layer `tap_layer`.

    Returns (last-token logits [B, V], cache with lengths = prompt_lens, residual [B, P, D] after layers
    [0, tap_layer), prompt positions [B, P]) — a drafter that reads layer l runs over the residual with
    `kv_limit=P`.
    """
    hidden, cache, tapped, positions = run_tapped(params, tokens, cache, cfg, tap_layer)
    return last_token_logits(params, hidden, prompt_lens, cfg), cache.with_lengths(prompt_lens), tapped, positions


def run_tapped(
    params: Params, tokens: jax.Array, cache: KVCache, cfg: ModelConfig, tap_layer: int
) -> tuple[jax.Array, KVCache, jax.Array, jax.Array]:
    """Every layer over tokens [B, P] from position 0 -> (final residual [B, P, D], cache, residual [B, P, D] entering
    layer `tap_layer`, positions [B, P]): `prefill_tapped`'s pass, every position's output kept."""
    padded = tokens.shape[1]
    positions = prompt_positions(tokens)
    tapped, cache = run_layers(params, embed(params, tokens, cfg), cache, positions, cfg, 0, tap_layer, kv_limit=padded)
    hidden, cache = run_layers(params, tapped, cache, positions, cfg, tap_layer, kv_limit=padded)
    return hidden, cache, tapped, positions
