"""The decoding engine: batched prefill of ragged prompts and a compiled decode loop, for any strategy.

    engine = Engine(model, Plain())
    out = engine.generate([ids_a, ids_b], max_new_tokens=64, sampling=SamplingConfig(temperature=0.7))

Prompts are right-padded to a length bucket (bounding recompiles); the cache holds
`capacity` >= longest prompt + max_new_tokens positions. The whole generation runs inside one
`lax.while_loop` (`generate`), or as a host loop over the same jitted step (`stream`) when tokens
must reach the terminal as they come. Compiled executables are cached per shape and settings, and
compile time is reported apart from run time.

On a device mesh (`Engine(..., mesh=eej.parallel.make_mesh(data=4, model=2))`), params and the
decode state are placed with the NamedShardings of `eej.parallel.DecodeSharding` and every
compiled function keeps its output state sharded the same way; jit propagates the rest, so
strategies run unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import weakref
from typing import Any, Callable, Iterator, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from eej.config import ModelConfig, SamplingConfig
from eej.decoding.calibration import CALIBRATION_STEPS, cached_step_times, step_times_key, store_step_times, time_loop
from eej.decoding.compiled_programs import PROGRAMS, new_owner
from eej.decoding.plain import Plain
from eej.decoding.sampling import row_streams, sample, token_keys
from eej.decoding.strategy import StepInputs, StepResult, Strategy
from eej.local_cache import compile_cache_hits, use_compilation_cache
from eej.model.cache import KVCache, init_cache
from eej.model.packed import pack_projections
from eej.model.transformer import Params, trace_settings
from eej.parallel.sharding import DecodeSharding, to_host
from eej.weights.registry import Model


class GenerationError(ValueError):
    """Bad generation input (empty prompt, prompt longer than the cache, ...)."""


class ScoringError(GenerationError):
    """A strategy that can't score references (`Engine.score`): its steps return no logits, or commit several tokens."""


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries. B rows, N = max_new_tokens.

    cache: model KV cache holding committed tokens except `pending`.
    method_state: the strategy's own state.
    pending: [B] newest committed token (not yet in the cache).
    output: [B, N] committed tokens (pad id where unused).
    num_new: [B] tokens committed so far.
    done: [B] the row hit EOS or its budget.
    key: PRNG key.
    noise: [B] uint32 each row's stream of token keys for coupled draws (eej.decoding.sampling.row_streams).
    steps: loop iterations so far.
    forwards, layers: [B] full-model forwards and transformer layers spent on each row while active.
    row_steps, speculated, exited, checked: [B] steps each row was active in, drafted tokens in, left the stack early
      in, checked whether to leave early in.
    queued: bool scalar: prompts wait for a row to free up (`Engine.generate` with a `batch_size`); the decode loop
      then returns as soon as a row finishes, for the engine to refill it.
    """

    cache: KVCache
    method_state: Any
    pending: jax.Array
    output: jax.Array
    num_new: jax.Array
    done: jax.Array
    key: jax.Array
    noise: jax.Array
    steps: jax.Array
    forwards: jax.Array
    layers: jax.Array
    row_steps: jax.Array
    speculated: jax.Array
    exited: jax.Array
    checked: jax.Array
    queued: jax.Array


@dataclasses.dataclass
class GenerationOutput:
    """Result of `Engine.generate` for B prompts.

    tokens: generated ids per row (the EOS that ended a row included).
    forwards: full-model forwards per row (plain decoding: one per token after the first; the
      prefill counts as one).
    layers: transformer layers computed per row (prefill excluded).
    row_steps: decode steps per row (while it was generating); speculated_steps, exited_steps, checked_steps: those
      of them in which the row drafted at least one token / its token left the stack early / the step checked whether
      it may (an early exit's predictors ran).
    method_state: the strategy's state after the last step (device arrays; e.g. a method's own counters, the
      step times the engine measured for it).
    """

    tokens: list[list[int]]
    prompt_lengths: list[int]
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float
    forwards: list[int]
    layers: list[float]
    steps: int
    method_state: Any = None
    row_steps: list[int] = dataclasses.field(default_factory=list)
    speculated_steps: list[int] = dataclasses.field(default_factory=list)
    exited_steps: list[int] = dataclasses.field(default_factory=list)
    checked_steps: list[int] = dataclasses.field(default_factory=list)

    @property
    def new_tokens(self) -> list[int]:
        return [len(t) for t in self.tokens]

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        return sum(self.new_tokens) / max(self.seconds, 1e-9)


@dataclasses.dataclass
class ScoreOutput:
    """Result of `Engine.score` for B (prompt, reference) rows.

    logprobs: per row, the log-probability of each reference token under the scoring strategy's own compute
      path, teacher-forced (entry i: token i given the prompt and reference tokens 0..i-1).
    choices: per row, the token the strategy would have committed (greedy) at each of those positions.
    strategy: the name of the strategy that scored ("plain" for a lossless method: its distribution is plain's).
    """

    logprobs: list[list[float]]
    choices: list[list[int]]
    strategy: str
    seconds: float
    compile_seconds: float

    @property
    def nll(self) -> list[float]:
        """Per row, the summed negative log-likelihood of its reference (0.0 for an empty one)."""
        return [-float(sum(lp)) for lp in self.logprobs]

    @property
    def tokens(self) -> list[int]:
        """Per row, the reference tokens scored."""
        return [len(lp) for lp in self.logprobs]

    @property
    def perplexity(self) -> float | None:
        """exp(total NLL / total tokens) over every row (None: no token scored)."""
        total = sum(self.tokens)
        return float(np.exp(sum(self.nll) / total)) if total else None


def length_bucket(n: int) -> int:
    """Round a length up to 16, 32, 64, ..., 512, then to multiples of 512 (bounds recompiles)."""
    if n <= 512:
        return max(16, 1 << (max(n, 1) - 1).bit_length())
    return -(-n // 512) * 512


def _commit(state: DecodeState, result: StepResult, eos_ids: tuple[int, ...], max_new: int) -> DecodeState:
    """Append each active row's new tokens, stopping at its first EOS or at its budget."""
    tokens = result.tokens
    batch, k = tokens.shape
    j = jnp.arange(k)[None, :]
    counts = jnp.where(state.done, 0, jnp.minimum(result.counts, max_new - state.num_new))
    if eos_ids:
        is_eos = jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32)) & (j < counts[:, None])
        first_eos = jnp.argmax(is_eos, axis=1)
        hit_eos = jnp.any(is_eos, axis=1)
        counts = jnp.where(hit_eos, first_eos + 1, counts)
    else:
        hit_eos = jnp.zeros((batch,), bool)
    slots = jnp.where(j < counts[:, None], state.num_new[:, None] + j, max_new)  # max_new: out of range, dropped
    output = state.output.at[jnp.arange(batch)[:, None], slots].set(tokens, mode="drop")
    last = jnp.take_along_axis(tokens, jnp.maximum(counts - 1, 0)[:, None], axis=1)[:, 0]
    num_new = state.num_new + counts
    active = ~state.done
    return state.replace(
        cache=result.cache,
        method_state=result.method_state,
        pending=jnp.where(counts > 0, last, state.pending),
        output=output,
        num_new=num_new,
        done=state.done | hit_eos | (num_new >= max_new),
        steps=state.steps + 1,
        forwards=state.forwards + jnp.where(active, result.forwards, 0),
        layers=state.layers + jnp.where(active, result.layers, 0.0),
        row_steps=state.row_steps + active,
        speculated=state.speculated + (active & (result.drafted > 0) if result.drafted is not None else 0),
        exited=state.exited + (active & result.exited if result.exited is not None else 0),
        checked=state.checked + (active & result.checked if result.checked is not None else 0),
    )


def _prefill(
    params: Params,
    method_params: Any,
    tokens: jax.Array,
    prompt_lens: jax.Array,
    key: jax.Array,
    rows: jax.Array,
    draws: jax.Array,
    *,
    cfg: ModelConfig,
    strategy: Strategy,
    sampling: SamplingConfig,
    capacity: int,
    max_new: int,
    eos_ids: tuple[int, ...],
) -> DecodeState:
    """Prompts [B, P] (right-padded, lengths [B]) -> the decode state holding each row's first token. key: the
    generation's PRNG key, which with rows [B] int32 (the prompts' places in the generation) gives each row its stream
    of coupled draws; draws: the PRNG key of the first tokens' other draws and of the decode loop's (a generation's
    first prefill: `key`)."""
    batch = tokens.shape[0]
    cache = init_cache(cfg, batch, capacity)
    logits, cache, method_state = strategy.prefill(params, method_params, tokens, prompt_lens, cache, cfg)
    noise = row_streams(key, rows)
    key, sub = jax.random.split(draws)
    first = sample(logits, sub, sampling, token_keys(noise, prompt_lens))
    done = jnp.isin(first, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else jnp.zeros((batch,), bool)
    return _first_state(cache, method_state, first, done | (max_new <= 1), key, noise, max_new, cfg)


def _first_state(
    cache: KVCache, method_state: Any, first: jax.Array, done: jax.Array, key: jax.Array, noise: jax.Array,
    max_new: int, cfg: ModelConfig
) -> DecodeState:
    """The decode state after the prefill committed `first` [B] (rows `done` [B] already finished); `noise` [B]
    the rows' streams of token keys."""
    batch = first.shape[0]
    output = jnp.full((batch, max_new), cfg.pad_id, jnp.int32).at[:, 0].set(first)
    return DecodeState(
        cache=cache,
        method_state=method_state,
        pending=first,
        output=output,
        num_new=jnp.ones((batch,), jnp.int32),
        done=done,
        key=key,
        noise=noise,
        steps=jnp.zeros((), jnp.int32),
        forwards=jnp.ones((batch,), jnp.int32),
        layers=jnp.zeros((batch,), jnp.float32),
        row_steps=jnp.zeros((batch,), jnp.int32),
        speculated=jnp.zeros((batch,), jnp.int32),
        exited=jnp.zeros((batch,), jnp.int32),
        checked=jnp.zeros((batch,), jnp.int32),
        queued=jnp.zeros((), bool),
    )


def _advance(
    params: Params,
    method_params: Any,
    state: DecodeState,
    *,
    cfg: ModelConfig,
    strategy: Strategy,
    sampling: SamplingConfig,
    max_new: int,
    eos_ids: tuple[int, ...],
) -> DecodeState:
    """One strategy step followed by the engine's commit."""
    state, result = _step(params, method_params, state, cfg=cfg, strategy=strategy, sampling=sampling)
    return _commit(state, result, eos_ids, max_new)


def _step(
    params: Params,
    method_params: Any,
    state: DecodeState,
    *,
    cfg: ModelConfig,
    strategy: Strategy,
    sampling: SamplingConfig,
    scoring: bool = False,
) -> tuple[DecodeState, StepResult]:
    """One strategy step from `state` -> (state with the key advanced, the step's result, checked at trace time)."""
    key, sub = jax.random.split(state.key)
    inputs = StepInputs(params=params, method_params=method_params, cache=state.cache, method_state=state.method_state,
                        pending=state.pending, key=sub, active=~state.done, sampling=sampling, cfg=cfg, scoring=scoring,
                        remaining=state.output.shape[1] - state.num_new, noise=state.noise, queued=state.queued)
    result = strategy.step(inputs)
    batch = state.pending.shape[0]
    try:  # a strategy of your own gets told what it returned wrong, at trace time
        chex.assert_shape(result.tokens, (batch, None))
        chex.assert_shape([result.counts, result.forwards, result.layers], (batch,))
        chex.assert_type(result.tokens, int)
        chex.assert_trees_all_equal_shapes_and_dtypes(result.cache, state.cache)
        if result.logits is not None:
            chex.assert_shape(result.logits, (batch, cfg.vocab_size))
    except AssertionError as e:
        raise GenerationError(f"{type(strategy).__name__}.step returned a StepResult of the wrong shape or dtype: {e}") from None
    return state.replace(key=key), result


def _token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits [B, V]) at tokens [B] -> [B] float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=1)[:, 0]


def _score_prefill(
    params: Params,
    method_params: Any,
    tokens: jax.Array,
    prompt_lens: jax.Array,
    references: jax.Array,
    reference_lens: jax.Array,
    key: jax.Array,
    *,
    cfg: ModelConfig,
    strategy: Strategy,
    sampling: SamplingConfig,
    capacity: int,
    max_new: int,
    eos_ids: tuple[int, ...],
) -> tuple[DecodeState, jax.Array]:
    """The prefill of `Engine.score`: prompts [B, P], references [B, N] (right-padded, lengths [B]).

    The prefill's last-token logits score reference token 0, which is then committed in place of the sampled
    token. Returns (decode state, (log-probs [B, N] float32, greedy choices [B, N] int32): entry 0 filled, zeros
    elsewhere and for empty references).
    """
    batch = tokens.shape[0]
    cache = init_cache(cfg, batch, capacity)
    logits, cache, method_state = strategy.prefill(params, method_params, tokens, prompt_lens, cache, cfg)
    first = references[:, 0]
    logprobs = jnp.zeros(references.shape, jnp.float32).at[:, 0].set(
        jnp.where(reference_lens > 0, _token_logprobs(logits, first), 0.0))
    choices = jnp.zeros(references.shape, jnp.int32).at[:, 0].set(jnp.argmax(logits, axis=-1).astype(jnp.int32))
    state = _first_state(cache, method_state, first, reference_lens <= 1, key, row_streams(key, batch), max_new, cfg)
    return state, (logprobs, choices)


def _score_loop(
    params: Params,
    method_params: Any,
    state: DecodeState,
    references: jax.Array,
    reference_lens: jax.Array,
    scores: tuple[jax.Array, jax.Array],
    *,
    cfg: ModelConfig,
    strategy: Strategy,
    sampling: SamplingConfig,
    max_new: int,
    eos_ids: tuple[int, ...],
) -> tuple[DecodeState, tuple[jax.Array, jax.Array]]:
    """Teacher-forced decoding: each step feeds reference token i - 1 (the pending token), the step's logits score
    reference token i, and token i is committed in place of the step's own. References [B, N], lengths [B],
    scores (log-probs [B, N], greedy choices [B, N], from `_score_prefill`) -> (final state, scores filled for
    i < each row's length)."""
    batch, n = references.shape
    rows = jnp.arange(batch)

    def body(carry):
        state, (logprobs, choices) = carry
        state, result = _step(params, method_params, state, cfg=cfg, strategy=strategy, sampling=sampling, scoring=True)
        if result.logits is None:
            raise ScoringError(
                f"{type(strategy).__name__}.step returned no logits (StepResult.logits) when scoring: it can't score "
                "references; return the logits each step draws its token from"
            )
        i = state.num_new  # [B] the reference token this step scores (the pending one is i - 1)
        target = references[rows, jnp.minimum(i, n - 1)]
        active = ~state.done
        slot = jnp.where(active, i, n)  # n: out of range, dropped
        logprobs = logprobs.at[rows, slot].set(_token_logprobs(result.logits, target), mode="drop")
        choices = choices.at[rows, slot].set(jnp.argmax(result.logits, axis=-1).astype(jnp.int32), mode="drop")
        forced = result.replace(tokens=jnp.broadcast_to(target[:, None], result.tokens.shape),
                                counts=jnp.ones((batch,), jnp.int32))
        state = _commit(state, forced, (), max_new)
        return state.replace(done=state.done | (state.num_new >= reference_lens)), (logprobs, choices)

    return lax.while_loop(lambda c: jnp.any(~c[0].done) & (c[0].steps < max_new), body, (state, scores))


def _decode_loop(params: Params, method_params: Any, state: DecodeState, **static: Any) -> DecodeState:
    """Steps until every row is done (at most max_new steps), or, while `state.queued`, until a row that was generating
    finishes (the engine refills it: `_refill`)."""
    max_new = static["max_new"]
    idle = state.done  # rows done before this call: a queue's rows left without a prompt

    def go_on(s: DecodeState) -> jax.Array:
        return jnp.any(~s.done) & (s.steps < max_new) & ~(s.queued & jnp.any(s.done & ~idle))

    return lax.while_loop(go_on, lambda s: _advance(params, method_params, s, **static), state)


def _refill(params: Params, method_params: Any, state: DecodeState, fresh: DecodeState, slots: jax.Array,
            picks: jax.Array, queued: jax.Array, *, rowwise: tuple[bool, ...]) -> DecodeState:
    """(params and method_params unused: every engine program takes them first, `Engine._get` keys on the rest.)
    `state` (B rows) with rows `slots` [R] replaced by rows `picks` [R] of `fresh` (newly prefilled rows): every leaf
    that has a row axis (`rowwise`, one flag per leaf of a DecodeState) takes fresh's rows there; the rest (the PRNG
    key, a method's measured costs and other batch-wide state) stay the state's. The step counter restarts (the loop's
    bound of max_new steps holds per row); `queued`: whether prompts still wait after this refill.

    `fresh` may have been prefilled with a smaller cache (its prompts' own capacity): its rows then fill the first
    positions of the slots' caches, and the positions past them keep what the slot's last prompt left there. Nothing
    reads them: attention reads a row's cache below its length only (rejected drafts are left the same way), and
    the row's own steps write each position before its length passes it."""
    leaves, tree = jax.tree.flatten(state)
    new = jax.tree.leaves(fresh)

    def merge(old: jax.Array, f: jax.Array) -> jax.Array:
        if any(n > m for n, m in zip(f.shape[1:], old.shape[1:])):
            raise ValueError(f"a refill's leaf {f.shape} exceeds the running state's {old.shape}")
        return old.at[(slots, *(slice(0, n) for n in f.shape[1:]))].set(f[picks])

    merged = [merge(old, f) if per_row else old for old, f, per_row in zip(leaves, new, rowwise)]
    return jax.tree.unflatten(tree, merged).replace(steps=jnp.zeros((), jnp.int32), queued=queued)


def _leaf_key(leaf: Any) -> tuple:
    """What a compiled program depends on of one argument leaf: its abstract value (shape, dtype, weak type) and, for
    an array already placed, its sharding."""
    return jax.typeof(leaf), getattr(leaf, "sharding", None)


class Engine:
    """Generates with `strategy` on `model`; compiled functions are cached per shape and setting (in the
    process-wide eej.decoding.compiled_programs.PROGRAMS, which releases old ones near the memory-map limit).

    share_programs: run the compiled programs of any other live engine with the same model config, strategy and
    shapes, and let them run this one's (default); False compiles programs of its own: a benchmark's contestants,
    whose compile and code placement should be their own (an A/A control measures them), or an experiment that
    swaps a traced function between engines."""

    def __init__(
        self,
        model: Model,
        strategy: Strategy | None = None,
        method_params: Any = None,
        *,
        cache_size: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
        share_programs: bool = True,
    ):
        use_compilation_cache()  # compiled programs persist on disk between processes (eej.local_cache)
        self.compile_cache_hits = 0  # programs this engine loaded from that cache instead of compiling
        self.strategy = strategy or Plain()
        self.cache_size = cache_size
        self.strategy.validate(model.cfg, method_params)
        self.programs = PROGRAMS
        self._owner = new_owner()
        self._private = None if share_programs else self._owner  # part of every key of a private engine's programs
        weakref.finalize(self, self.programs.forget, self._owner)  # its programs go with it unless others use them
        self._step_times: dict[tuple, list[float] | None] = {}
        self._rowwise_memo: dict[tuple, tuple[bool, ...]] = {}  # per layout: which DecodeState leaves have a row axis
        self._learned: dict[SamplingConfig, Any] = {}  # what the last generation per sampling learned (Strategy.learned)
        self.mesh = mesh
        self._sharding = None
        if mesh is not None and mesh.size > 1 and "cpu" in (model.cfg.attention_impl, model.cfg.matmul_impl):
            raise GenerationError(f"eej's CPU kernels run off a mesh; to decode on a mesh of {mesh.size} devices load "
                                  "the model with eej.load_model(..., kernels='xla')")
        if mesh is not None:
            self._sharding = sharding = DecodeSharding(mesh, model.cfg)
            model = dataclasses.replace(model, params=sharding.place(model.params, sharding.params(model.params)))
            method_params = sharding.place(method_params, sharding.params(method_params))
        if model.cfg.matmul_impl == "cpu":  # the CPU matmul kernel reads projections in column tiles, packed once here
            model = dataclasses.replace(model, params=pack_projections(model.params))
            method_params = pack_projections(method_params)
        self.model = model
        self.method_params = method_params

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    # ------------------------------------------------------------------ shapes and inputs

    def _layout(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[int, int]:
        if not prompts:
            raise GenerationError("no prompts given")
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise GenerationError("a prompt is empty; give at least one token")
        for p in prompts:
            bad = [t for t in p if not 0 <= int(t) < self.cfg.vocab_size]
            if bad:
                raise GenerationError(f"token id {bad[0]} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        longest = max(lengths)
        need = longest + max_new_tokens
        if self.cache_size is not None:
            capacity = self.cache_size
            if need > capacity:
                raise GenerationError(
                    f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = {need} exceeds the cache of "
                    f"{capacity} positions; shorten the prompt, lower max_new_tokens or raise the cache size"
                )
        else:
            if need > self.cfg.max_position:
                raise GenerationError(
                    f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = {need} exceeds the model's "
                    f"context of {self.cfg.max_position} positions; shorten the prompt or lower max_new_tokens"
                )
            capacity = min(length_bucket(need), self.cfg.max_position)
        return min(length_bucket(longest), capacity), capacity

    def _inputs(self, prompts: Sequence[Sequence[int]], padded: int) -> tuple[jax.Array, jax.Array]:
        tokens = np.full((len(prompts), padded), self.cfg.pad_id, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)

    def _get(
        self, name: str, fn: Callable, static: dict, args: tuple, donate: tuple[int, ...], batch: int
    ) -> tuple[Callable, float]:
        """The compiled `fn` for these args and `static` (`batch` rows); second value: compile seconds (0 if cached).

        Cached in `self.programs` (the process-wide PROGRAMS) by what the program is (eej.decoding.compiled_programs),
        so any live engine with the same model config, strategy, settings and argument shapes runs it (unless either
        was built with share_programs=False)."""
        key = (name, fn, tuple(sorted(static.items(), key=lambda kv: kv[0])), donate, self.mesh if self._sharding else None,
               jax.tree.structure(args), tuple(_leaf_key(a) for a in jax.tree.leaves(args)), trace_settings(),
               self._private)
        cached = self.programs.get(self._owner, key)
        if cached is not None:
            return cached, 0.0
        start, hits = time.perf_counter(), compile_cache_hits()
        self.programs.make_room()
        fn = functools.partial(fn, **static)
        if self._sharding is None:
            compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
        else:  # the output DecodeState keeps the state's shardings (rows over `data`, heads over `model`)
            with jax.set_mesh(self.mesh):
                out = self._sharding.state(jax.eval_shape(fn, *args), batch)
                compiled = jax.jit(fn, donate_argnums=donate, out_shardings=out).lower(*args).compile()
        self.programs.put(self._owner, key, compiled)
        self.compile_cache_hits += compile_cache_hits() - hits
        return compiled, time.perf_counter() - start

    # ------------------------------------------------------------------ public API

    def _prefill(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingConfig,
        seed: int,
        eos_ids: tuple[int, ...] | None,
        *,
        rows: Sequence[int] | None = None,
        layout: tuple[int, int] | None = None,
        draws: jax.Array | None = None,
    ) -> tuple[DecodeState, dict, float, float]:
        """Prefill -> (state holding the first token, loop settings, run seconds, compile seconds).

        rows: the prompts' places in the generation (default 0..B-1: their coupled draws' streams); layout: (padded
        prompt length, cache capacity) instead of the prompts' own (a queue lays its cache out for all its prompts);
        draws: the PRNG key of the first tokens' uncoupled draws, instead of `seed`'s (a queue's refills)."""
        eos = self.cfg.eos_ids if eos_ids is None else tuple(eos_ids)
        padded, capacity = self._layout(prompts, max_new_tokens) if layout is None else layout
        tokens, lens = self._inputs(prompts, padded)
        places = jnp.arange(len(prompts), dtype=jnp.int32) if rows is None else jnp.asarray(rows, jnp.int32)
        static = dict(cfg=self.cfg, strategy=self.strategy, sampling=sampling, max_new=max_new_tokens, eos_ids=eos)
        key = jax.random.PRNGKey(seed)
        args = (self.model.params, self.method_params, tokens, lens, key, places, key if draws is None else draws)
        if self._sharding is not None:  # rows over `data`; the keys replicated
            sharding = self._sharding
            tokens, lens, places = sharding.place((tokens, lens, places), sharding.state((tokens, lens, places), len(prompts)))
            key = sharding.place(key, sharding.named(jax.sharding.PartitionSpec()))
            args = (*args[:2], tokens, lens, key, places, key)
        fn, compile_s = self._get("prefill", _prefill, {**static, "capacity": capacity}, args, donate=(), batch=len(prompts))
        start = time.perf_counter()
        state = jax.block_until_ready(fn(*args))
        return state, static, time.perf_counter() - start, compile_s

    def _calibrated(self, state: DecodeState, static: dict, loop: Callable, batch: int) -> tuple[DecodeState, float]:
        """`state` told the strategy's step times at this batch and cache size (measured on the compiled decode
        `loop` once per shape, kept on disk per machine if measured steadily: eej.decoding.calibration); second: seconds spent measuring."""
        strategy, sampling = static["strategy"], static["sampling"]
        points = strategy.calibration_points()
        if not points:
            return state, 0.0
        memo = (batch, state.cache.capacity, sampling)
        start = time.perf_counter()
        if memo not in self._step_times:
            key = step_times_key(self.cfg, strategy, sampling, batch, state.cache.capacity)
            ms = cached_step_times(key, len(points))
            if ms is None:  # the loop forced to each point, for a few steps from this state
                steps = static["max_new"] - CALIBRATION_STEPS  # the loop's counter: this many steps to go
                edits = [lambda st, edit=edit: st.replace(method_state=edit(st.method_state), steps=jnp.full((), steps, jnp.int32))
                         for edit in points]
                measured = time_loop(lambda st: loop(self.model.params, self.method_params, st), state, edits)
                ms = None if measured is None else measured.ms
                if measured is not None and measured.steady:  # a disturbed table serves this process only
                    store_step_times(key, ms)
            self._step_times[memo] = ms
        ms = self._step_times[memo]
        state = state if ms is None else state.replace(method_state=strategy.calibrate(state.method_state, ms))
        return state, time.perf_counter() - start

    def _start_from_learned(self, state: DecodeState, sampling: SamplingConfig, learned: Any = None) -> DecodeState:
        """`state` (after the prefill and calibration) told what this engine's last generation with `sampling` learned
        (`Strategy.start_from`; e.g. the adaptive speculative methods' acceptance), or `learned` (a queue's refilled rows:
        what its running batch has learned), each array where it was placed."""
        learned = self._learned.get(sampling) if learned is None else learned
        if learned is None:
            return state
        told = self.strategy.start_from(state.method_state, learned)
        told = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), told, state.method_state)
        return state.replace(method_state=told)

    def _learn(self, state: DecodeState, sampling: SamplingConfig) -> None:
        learned = self.strategy.learned(state.method_state)
        if learned is not None:
            self._learned[sampling] = learned

    def forget(self) -> None:
        """Drop what earlier generations learned: the next one starts from the method's uninformed prior (as a fresh
        engine's first does; e.g. under residual sampling, for a generation whose draws must not depend on the
        engine's history — coupled draws never do for a lossless method: eej.decoding.sampling — or for an adaptive
        exit method whose text, greedy too, must not depend on which steps earlier generations taught it to exit)."""
        self._learned.clear()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
        eos_ids: tuple[int, ...] | None = None,
        batch_size: int | None = None,
    ) -> GenerationOutput:
        """Generate for a batch of token-id prompts inside one compiled loop.

        eos_ids: token ids that end a row (default: the model's); `()` never stops early. An adaptive method starts
        from what the engine's last generation with the same sampling learned (`forget` drops it).
        batch_size: decode at most this many rows at once (None: every prompt in one batch). The other prompts wait
        in a queue, in order (prefilled batch_size at a time, ahead of need), and each takes the row of the first to
        finish (continuous batching: no row idles while a prompt waits, and an adaptive method weighs the batch's
        throughput rather than its last row). Each prompt keeps the stream of coupled draws of its place in `prompts`, so the queue
        samples the tokens one batch of all of them would. `steps` then counts the decode loop's steps over the
        whole queue; `prefill_seconds` every prefill, refills included.
        """
        if batch_size is not None and batch_size < 1:
            raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size is not None and len(prompts) > batch_size:
            return self._generate_queued(prompts, max_new_tokens, sampling, seed, eos_ids, batch_size)
        state, static, prefill_s, compile_s = self._prefill(prompts, max_new_tokens, sampling, seed, eos_ids)
        args = (self.model.params, self.method_params, state)
        fn, loop_compile_s = self._get("loop", _decode_loop, static, args, donate=(2,), batch=len(prompts))
        state, calibration_s = self._calibrated(state, static, fn, len(prompts))
        state = self._start_from_learned(state, sampling)
        start = time.perf_counter()
        state = jax.block_until_ready(fn(self.model.params, self.method_params, state))
        decode_s = time.perf_counter() - start
        self._learn(state, sampling)
        return self._output(state, prompts, prefill_s, decode_s, compile_s + loop_compile_s + calibration_s)

    def _generate_queued(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingConfig,
                         seed: int, eos_ids: tuple[int, ...] | None, batch_size: int) -> GenerationOutput:
        """`generate` for more prompts than `batch_size` rows: a queue (see there)."""
        if self._sharding is not None:
            raise GenerationError(f"a queue of {len(prompts)} prompts for {batch_size} rows decodes off a mesh for now; "
                                  "on a mesh give batch_size=None (one batch) or call generate once per batch")
        _, capacity = self._layout(prompts, max_new_tokens)  # checks every prompt; one cache layout for the queue

        def prefill(places: list[int], key: jax.Array, first: bool = False) -> tuple[DecodeState, dict, float, float]:
            """The prompts at `places` prefilled: the first batch with the queue's cache (the decode loop's shape), a
            refill with its own prompts' (smaller when they are shorter; `_refill` writes it into the queue's)."""
            chunk = [prompts[i] for i in places]
            layout = (min(length_bucket(max(len(p) for p in chunk)), capacity), capacity) if first else None
            return self._prefill(chunk, max_new_tokens, sampling, seed, eos_ids, rows=places, layout=layout, draws=key)

        n, rows = len(prompts), batch_size
        state, static, prefill_s, compile_s = prefill(list(range(rows)), jax.random.PRNGKey(seed), first=True)
        params, method_params = self.model.params, self.method_params
        loop, loop_compile_s = self._get("loop", _decode_loop, static, (params, method_params, state), donate=(2,), batch=rows)
        state, calibration_s = self._calibrated(state, static, loop, rows)
        state = self._start_from_learned(state, sampling)
        compile_s += loop_compile_s + calibration_s
        step_ms = self._step_times.get((rows, capacity, sampling))
        rowwise = self._rowwise(static, capacity)
        state = state.replace(queued=jnp.asarray(True))
        placed = list(range(rows))  # the prompt each row decodes (-1: none)
        # The next prompts are prefilled `rows` at a time, ahead of need (a one-row prefill of a short prompt costs
        # more per token than a batch's), and take rows as they free up: `ahead` holds the prompts `buffer` prefilled.
        buffer, ahead, taken, refills = None, [], 0, 0
        merges: dict[tuple[int, int, int], Callable] = {}  # the refill program per (rows taken, rows prefilled, capacity)
        finished: dict[int, dict[str, Any]] = {}
        steps, decode_s = 0, 0.0
        while True:
            start = time.perf_counter()  # the host's bookkeeping between loop calls counts as decoding time
            view = {f: to_host(getattr(state, f)) for f in ("done", "num_new", "output", "forwards", "layers",
                                                            "row_steps", "speculated", "exited", "checked")}
            decode_s += time.perf_counter() - start
            for b in range(rows):
                if placed[b] >= 0 and view["done"][b]:
                    finished[placed[b]] = {f: view[f][b] for f in view}
                    placed[b] = -1
            free = [b for b in range(rows) if placed[b] < 0]
            unplaced = n - len(finished) - sum(p >= 0 for p in placed)
            if unplaced and free:  # refill, then look again: a prompt may end in its own prefill (EOS first)
                if taken == len(ahead):
                    ahead, taken, refills = list(range(n - unplaced, min(n, n - unplaced + rows))), 0, refills + 1
                    buffer, _, seconds, c = prefill(ahead, jax.random.fold_in(jax.random.PRNGKey(seed), refills))
                    if step_ms is not None:  # the rows will decode at the running batch's measured step times
                        buffer = buffer.replace(method_state=self.strategy.calibrate(buffer.method_state, step_ms))
                    prefill_s, compile_s = prefill_s + seconds, compile_s + c
                picks = list(range(taken, min(len(ahead), taken + len(free))))
                slots, taken = free[: len(picks)], taken + len(picks)
                where = (jnp.asarray(slots, jnp.int32), jnp.asarray(picks, jnp.int32), jnp.asarray(unplaced > len(picks)))
                shape = (len(picks), len(ahead), buffer.cache.capacity)
                if shape not in merges:
                    merges[shape], merge_compile_s = self._get(
                        "refill", _refill, {"rowwise": rowwise}, (params, method_params, state, buffer, *where),
                        donate=(2,), batch=rows)
                    compile_s += merge_compile_s
                start = time.perf_counter()
                fresh = self._start_from_learned(buffer, sampling, self.strategy.learned(state.method_state))
                state = jax.block_until_ready(merges[shape](params, method_params, state, fresh, *where))
                prefill_s += time.perf_counter() - start
                for b, j in zip(slots, picks):
                    placed[b] = ahead[j]
                continue
            if all(p < 0 for p in placed):
                break
            start = time.perf_counter()
            state = jax.block_until_ready(loop(params, method_params, state))
            decode_s += time.perf_counter() - start
            steps += int(to_host(state.steps))
            state = state.replace(steps=jnp.zeros((), jnp.int32))  # each call's bound of max_new steps is per row
        self._learn(state, sampling)
        rows_out = [finished[i] for i in range(n)]
        return GenerationOutput(
            tokens=[r["output"][: r["num_new"]].tolist() for r in rows_out],
            prompt_lengths=[len(p) for p in prompts],
            prefill_seconds=prefill_s,
            decode_seconds=decode_s,
            compile_seconds=compile_s,
            forwards=[int(r["forwards"]) for r in rows_out],
            layers=[float(r["layers"]) for r in rows_out],
            steps=steps,
            method_state=state.method_state,
            row_steps=[int(r["row_steps"]) for r in rows_out],
            speculated_steps=[int(r["speculated"]) for r in rows_out],
            exited_steps=[int(r["exited"]) for r in rows_out],
            checked_steps=[int(r["checked"]) for r in rows_out],
        )

    def _rowwise(self, static: dict, capacity: int) -> tuple[bool, ...]:
        """For each leaf of this engine's DecodeState: whether it has a row axis (its shape follows the batch size)."""
        memo = (capacity, *sorted(static.items(), key=lambda kv: kv[0]))
        if memo in self._rowwise_memo:
            return self._rowwise_memo[memo]

        def shapes(batch: int) -> list[tuple[int, ...]]:
            ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
            args = (self.model.params, self.method_params, ints(batch, min(16, capacity)), ints(batch),
                    jax.random.PRNGKey(0), ints(batch), jax.random.PRNGKey(0))
            out = jax.eval_shape(functools.partial(_prefill, **static, capacity=capacity), *args)
            return [leaf.shape for leaf in jax.tree.leaves(out)]

        self._rowwise_memo[memo] = tuple(a != b for a, b in zip(shapes(1), shapes(2)))
        return self._rowwise_memo[memo]

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        references: Sequence[Sequence[int]],
        max_new_tokens: int | None = None,
        seed: int = 0,
    ) -> ScoreOutput:
        """Teacher-forced log-probabilities of `references` (token ids, one per prompt) under this strategy's own
        compute path, decided greedily: the prompt's prefill scores reference token 0, then one compiled loop of the
        strategy's steps, each feeding the previous reference token (so the cache and the method's state — SkipDecode's
        position in its schedule, SpecEE's and M2R2's exit decisions and rates — evolve as they would while decoding
        the reference) and scoring the next one with `StepResult.logits`.

        A lossless strategy's distribution is plain decoding's by construction: it is scored by `Plain` on the same
        model. max_new_tokens: the decode budget to lay the cache out for (default: the longest reference; the same
        as a `generate` call's gives the same shapes and the same measured step costs); references must fit it.
        Raises ScoringError for a lossy strategy that commits several tokens per step or returns no logits.
        """
        if len(references) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts but {len(references)} references")
        longest = max((len(r) for r in references), default=0)
        budget = max(longest, 1) if max_new_tokens is None else max_new_tokens
        if longest > budget:
            raise GenerationError(f"a reference of {longest} tokens exceeds max_new_tokens {budget}")
        for r in references:
            bad = [t for t in r if not 0 <= int(t) < self.cfg.vocab_size]
            if bad:
                raise GenerationError(f"reference token id {bad[0]} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        strategy, method_params = self.strategy, self.method_params
        if strategy.lossless:
            strategy, method_params = Plain(), None
        elif strategy.max_step_tokens != 1:
            raise ScoringError(f"{type(strategy).__name__} commits up to {strategy.max_step_tokens} tokens per step; "
                               "scoring needs a lossy method's steps to commit one token each")
        padded, capacity = self._layout(prompts, budget)
        tokens, lens = self._inputs(prompts, padded)
        refs = np.full((len(prompts), budget), self.cfg.pad_id, np.int32)
        for i, r in enumerate(references):
            refs[i, : len(r)] = r
        ref_lens = jnp.asarray([len(r) for r in references], jnp.int32)
        static = {"cfg": self.cfg, "strategy": strategy, "sampling": SamplingConfig(), "max_new": budget,
                  "eos_ids": self.cfg.eos_ids}
        args = (self.model.params, method_params, tokens, lens, jnp.asarray(refs), ref_lens, jax.random.PRNGKey(seed))
        if self._sharding is not None:
            sharding = self._sharding
            placed = sharding.place(args[2:6], sharding.state(args[2:6], len(prompts)))
            args = (*args[:2], *placed, sharding.place(args[6], sharding.named(jax.sharding.PartitionSpec())))
        batch = len(prompts)
        prefill, compile_s = self._get("score-prefill", _score_prefill, {**static, "capacity": capacity}, args, (), batch)
        start = time.perf_counter()
        state, scores = jax.block_until_ready(prefill(*args))
        run_s = time.perf_counter() - start
        calibration_s = 0.0
        if strategy.calibration_points():  # the adaptive decisions as the decode loop would make them
            loop, loop_compile_s = self._get("loop", _decode_loop, static, (args[0], args[1], state), donate=(2,), batch=batch)
            state, calibration_s = self._calibrated(state, static, loop, batch)
            compile_s += loop_compile_s
        loop_args = (args[0], args[1], state, args[4], args[5], scores)
        loop, loop_compile_s = self._get("score-loop", _score_loop, static, loop_args, donate=(2, 5), batch=batch)
        start = time.perf_counter()
        _, (logprobs, choices) = jax.block_until_ready(loop(*loop_args))
        run_s += time.perf_counter() - start
        logprobs, choices = to_host(logprobs), to_host(choices)
        return ScoreOutput(logprobs=[logprobs[b, : len(r)].tolist() for b, r in enumerate(references)],
                           choices=[choices[b, : len(r)].tolist() for b, r in enumerate(references)], strategy=strategy.name, seconds=run_s, compile_seconds=compile_s + loop_compile_s + calibration_s)

    def lower(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        sampling: SamplingConfig = SamplingConfig(),
        platforms: tuple[str, ...] = ("tpu",),
    ) -> jax.stages.Lowered:
        """The decode loop for these prompts lowered to StableHLO for `platforms`, without running or compiling
        anything: e.g. whether a method lowers for a TPU, checked on a machine without one, or what its loop holds."""
        padded, capacity = self._layout(prompts, max_new_tokens)
        tokens, lens = self._inputs(prompts, padded)
        static = dict(cfg=self.cfg, strategy=self.strategy, sampling=sampling, max_new=max_new_tokens, eos_ids=self.cfg.eos_ids)
        key = jax.random.PRNGKey(0)
        args = (self.model.params, self.method_params, tokens, lens, key, jnp.arange(len(prompts)), key)
        state = jax.eval_shape(functools.partial(_prefill, **static, capacity=capacity), *args)
        loop = jax.jit(functools.partial(_decode_loop, **static))
        return loop.trace(self.model.params, self.method_params, state).lower(lowering_platforms=platforms)

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
        eos_ids: tuple[int, ...] | None = None,
    ) -> "TokenStream":
        """Like `generate`, but a host loop over the jitted step that yields each row's new tokens per step.

        Iterate over the result; afterwards its `.output` holds the `GenerationOutput`. The tokens
        are the same as `generate`'s.
        """
        state, static, prefill_s, compile_s = self._prefill(prompts, max_new_tokens, sampling, seed, eos_ids)
        args = (self.model.params, self.method_params, state)
        step, step_compile_s = self._get("step", _advance, static, args, donate=(2,), batch=len(prompts))
        if self.strategy.calibration_points():  # the step times are measured on the decode loop
            loop, loop_compile_s = self._get("loop", _decode_loop, static, args, donate=(2,), batch=len(prompts))
            state, calibration_s = self._calibrated(state, static, loop, len(prompts))
            step_compile_s += loop_compile_s + calibration_s
        state = self._start_from_learned(state, sampling)
        return TokenStream(self, step, state, prompts, prefill_s, compile_s + step_compile_s, sampling)

    def _output(self, state: DecodeState, prompts, prefill_s: float, decode_s: float, compile_s: float) -> GenerationOutput:
        output = to_host(state.output)
        num_new = to_host(state.num_new)
        return GenerationOutput(
            tokens=[output[b, : num_new[b]].tolist() for b in range(len(prompts))],
            prompt_lengths=[len(p) for p in prompts],
            prefill_seconds=prefill_s,
            decode_seconds=decode_s,
            compile_seconds=compile_s,
            forwards=to_host(state.forwards).tolist(),
            layers=to_host(state.layers).tolist(),
            steps=int(to_host(state.steps)),
            method_state=state.method_state,
            row_steps=to_host(state.row_steps).tolist(),
            speculated_steps=to_host(state.speculated).tolist(),
            exited_steps=to_host(state.exited).tolist(),
            checked_steps=to_host(state.checked).tolist(),
        )


class TokenStream:
    """Per-step new tokens of a streamed generation (see `Engine.stream`)."""

    def __init__(self, engine: Engine, step: Callable, state: DecodeState, prompts, prefill_s: float, compile_s: float,
                 sampling: SamplingConfig):
        self._engine, self._step, self._state, self._prompts = engine, step, state, prompts
        self._prefill_s, self._compile_s, self._sampling = prefill_s, compile_s, sampling
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[list[list[int]]]:
        state, engine = self._state, self._engine
        start = time.perf_counter()
        num_new = to_host(state.num_new)
        yield [[int(t)] for t in to_host(state.output[:, 0])]
        max_new = state.output.shape[1]
        while not bool(np.all(to_host(state.done))) and int(to_host(state.steps)) < max_new:
            state = self._step(engine.model.params, engine.method_params, state)
            new_num = to_host(state.num_new)
            output = to_host(state.output)
            yield [output[b, num_new[b] : new_num[b]].tolist() for b in range(len(self._prompts))]
            num_new = new_num
        engine._learn(state, self._sampling)
        self.output = engine._output(state, self._prompts, self._prefill_s, time.perf_counter() - start, self._compile_s)
