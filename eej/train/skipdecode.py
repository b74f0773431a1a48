"""Fine-tuning for SkipDecode: LoRA (or all weights) trained under the inference skip pattern.

    eej train skipdecode --budget 2x --data ../shared/data/train/*.json* --out runs/skipdecode-2x

The training forward (`skip_hidden`) runs every layer over whole sequences and keeps a layer's
output only for the tokens that run it at inference (`SkipSchedule.active_mask`; a skipped layer is
the identity for that token). It equals incremental skip decoding with the KV cache exactly: the
active set only shrinks with position, so every token a layer updates attends only to earlier tokens
that this layer also updated — the keys/values computed from skipped tokens' pass-through states
are never read (tests/test_skipdecode.py checks the logits against the engine's decode steps).

Positions: a sequence is [prompt | response]; its prompt length P is where the assistant mask
starts (the prefix the engine would prefill, generation prompt included). The token at position p
has generation index t = p - P; prompt tokens (t < 0) run all layers.

Loss on assistant targets: KL(full model || skip model) of the next-token distributions, plus
`ce_weight` x cross-entropy on the reference response. The full model is the frozen base model
(no adapters), computed in the same jitted step.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from eej.config import ModelConfig
from eej.decoding.skipdecode import SkipDecodeSettings, SkipSchedule
from eej.model.cache import init_cache
from eej.model.lora import init_lora, merge_lora, parse_targets
from eej.model.transformer import Params, block, canonical_layout, embed, logits_from_hidden, stack_layers
from eej.settings import from_settings, method_settings
from eej.train.data import DataOptions, batch_at, load_training_data
from eej.train.loop import TrainConfig, check_resume, masked_mean, read_log, run_settings, train
from eej.train.teacher import hidden_states
from eej.train.trainers import Trained, TrainError, check_options, option, register_trainer, save_trained
from eej.weights.registry import Model, with_kernels


@dataclasses.dataclass(frozen=True)
class SkipDecodeTraining:
    """`eej train skipdecode`'s options (see the module docstring)."""

    budget: str = option(help="a skipdecode preset of the model's config (2x, 3x, ...) or a settings FILE.yaml")
    rank: int = option(8, "LoRA rank", at_least=1, integer=True)
    alpha: float = option(16.0, "LoRA scale = alpha / rank")
    targets: str | None = option(None, "comma-separated projections to adapt (default: all of "
                                 "wq,wk,wv,wo,w_gate,w_up,w_down; wq,wk,wv,wo on a mixture-of-experts model)")
    full_finetune: bool = option(False, "train the adapted layers' weights instead of LoRA")
    adapt_layers: str = option(
        "top", "top: the layers generated tokens run above the warm-up (cheaper: the frozen bottom is shared with "
        "the teacher pass); all: every layer", choices=("top", "all"),
    )
    response_len: int = option(128, "score the first N assistant tokens of each sequence", at_least=1, integer=True)
    ce_weight: float = option(0.0, "weight of cross-entropy on the reference responses")
    no_remat: bool = option(False, "keep activations instead of recomputing them (more memory)", result=False)
    artifact: str | None = option(None, "where to write the trained artifact (default: OUT/skipdecode-BUDGET.npz)",
                                  result=False)

    def __post_init__(self) -> None:
        check_options(self, "skipdecode")


def prompt_lengths(loss_mask: jax.Array) -> jax.Array:
    """P per row [B]: the first assistant position of `loss_mask` [B, T] (rows without one: T)."""
    has = jnp.any(loss_mask > 0, axis=1)
    return jnp.where(has, jnp.argmax(loss_mask > 0, axis=1), loss_mask.shape[1]).astype(jnp.int32)


def _skip_layers(
    layers: dict[str, jax.Array], x: jax.Array, positions: jax.Array, active: jax.Array, cfg: ModelConfig, remat: bool
) -> jax.Array:
    """Stacked `layers` [L', ...] over residual x [B, T, D]; a layer's output is kept where active [B, T, L'] is set."""
    b, t = positions.shape
    empty = init_cache(cfg, b, t, num_layers=1)

    def layer_step(x, inputs):
        layer, keep = inputs
        y, _, _ = block(layer, x, empty.k[0], empty.v[0], positions, cfg)
        return jnp.where(keep[..., None], y, x), None

    if remat:
        layer_step = jax.checkpoint(layer_step)
    x, _ = lax.scan(layer_step, x, (layers, jnp.moveaxis(active, 2, 0)))
    return x


def _positions(tokens: jax.Array) -> jax.Array:
    b, t = tokens.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def skip_hidden(
    params: Params, tokens: jax.Array, prompt_lens: jax.Array, schedule: SkipSchedule, cfg: ModelConfig, remat: bool = True
) -> jax.Array:
    """The skip model's last residual stream [B, T, D] over right-padded sequences `tokens` [B, T].

    prompt_lens [B]: P per row; token p runs the layers of generation index p - P.
    """
    positions = _positions(tokens)
    active = schedule.active_mask(positions - prompt_lens[:, None], cfg.num_layers)  # [B, T, L]
    return _skip_layers(stack_layers(params["layers"]), embed(params, tokens, cfg), positions, active, cfg, remat)


def skip_hidden_above(
    params: Params,
    base_states: dict[int, jax.Array],
    prompt_lens: jax.Array,
    schedule: SkipSchedule,
    cfg: ModelConfig,
    first_layer: int,
    remat: bool = True,
) -> jax.Array:
    """`skip_hidden` when layers below `first_layer` are the base model's: only layers [first_layer, N) run.

    Valid for W <= first_layer <= the first band layer N - (L_max - W): then every generated token
    enters `first_layer` with the warm-up output and every prompt token with the full model's state
    at that depth, both read from `base_states` ({W: [B, T, D], first_layer: [B, T, D]}, e.g. from
    `eej.train.teacher.hidden_states` of the base model).
    """
    w, band_start = schedule.warmup_layers, schedule.band(cfg.num_layers)[0]
    if not w <= first_layer <= band_start:
        raise ValueError(f"first_layer must be in [{w}, {band_start}] for this schedule, got {first_layer}")
    x_w, x_first = base_states[w], base_states[first_layer]
    positions = _positions(x_w[..., 0])
    t = positions - prompt_lens[:, None]
    x = jnp.where((t < 0)[..., None], x_first, x_w)
    active = schedule.active_mask(t, cfg.num_layers)[..., first_layer:]
    layers = jax.tree.map(lambda a: a[first_layer:], stack_layers(params["layers"]))
    return _skip_layers(layers, x, positions, active, cfg, remat)


def response_window(values: jax.Array, prompt_lens: jax.Array, length: int, offset: int = 0) -> jax.Array:
    """values [B, T, ...] at positions P_b + offset + j, j < length -> [B, length, ...] (clipped to the sequence)."""
    index = jnp.clip(prompt_lens[:, None] + offset + jnp.arange(length), 0, values.shape[1] - 1)
    index = index.reshape(index.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, index, axis=1)


def distillation_loss(
    trainable: dict[str, Any],
    frozen: dict[str, Any],
    batch: dict[str, jax.Array],
    *,
    cfg: ModelConfig,
    schedule: SkipSchedule,
    first_layer: int,
    lora_scale: float,
    ce_weight: float,
    response_len: int,
    remat: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KL(full model || skip model) (+ ce_weight x CE) on the first `response_len` assistant targets.

    trainable: {"lora": adapters for layers [first_layer, N)} or {"layers": stacked layers [first_layer, N)}.
    frozen: {"params": the base model (stacked layers)} — also the teacher.
    batch: tokens [B, T] int32, loss_mask [B, T] (1 on assistant tokens, which follow the prompt).
    first_layer: the lowest adapted layer. Layers below it are the base model's, so one base-model
      pass gives the teacher and the student's input (`skip_hidden_above`) when W <= first_layer;
      first_layer < W runs the whole masked forward (`skip_hidden`).
    Returns (loss, metrics: kl, ce, agree = top-1 agreement with the teacher).
    """
    base = frozen["params"]
    if "lora" in trainable:
        student = merge_lora(base, trainable["lora"], scale=lora_scale, first_layer=first_layer)
    else:
        layers = jax.tree.map(lambda a, b: jnp.concatenate([a[:first_layer], b]), base["layers"], trainable["layers"])
        student = {**base, "layers": layers}
    tokens, mask = batch["tokens"], batch["loss_mask"]
    prompt_lens = prompt_lengths(mask)
    w, n = schedule.warmup_layers, cfg.num_layers
    depths = (w, first_layer, n) if first_layer >= w else (n,)
    states = {d: lax.stop_gradient(h) for d, h in hidden_states(base, tokens, cfg, depths).items()}
    if first_layer >= w:
        hidden = skip_hidden_above(student, states, prompt_lens, schedule, cfg, first_layer, remat)
    else:
        hidden = skip_hidden(student, tokens, prompt_lens, schedule, cfg, remat)
    # Position P - 1 + j predicts response token j: score j < response_len where that token is an assistant token.
    targets = response_window(tokens, prompt_lens, response_len)
    target_mask = response_window(mask, prompt_lens, response_len) * (prompt_lens[:, None] + jnp.arange(response_len) < tokens.shape[1])
    log_q = jax.nn.log_softmax(logits_from_hidden(student, response_window(hidden, prompt_lens, response_len, -1), cfg), -1)
    log_p = jax.nn.log_softmax(logits_from_hidden(base, response_window(states[n], prompt_lens, response_len, -1), cfg), -1)
    kl = masked_mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1), target_mask)
    ce = masked_mean(-jnp.take_along_axis(log_q, targets[..., None], axis=-1)[..., 0], target_mask)
    agree = masked_mean((jnp.argmax(log_q, -1) == jnp.argmax(log_p, -1)).astype(jnp.float32), target_mask)
    return kl + ce_weight * ce, {"kl": kl, "ce": ce, "agree": agree}


# ----------------------------------------------------------------------------- training


def train_skipdecode(model: Model, data: DataOptions, out_dir: str, options: SkipDecodeTraining, run: TrainConfig,
                     progress: bool = True) -> Trained:
    """Fine-tune `model` (LoRA or all weights) under the skip schedule of `options.budget`; writes the artifact."""
    model = with_kernels(model, "xla")  # gradients and teacher states through XLA's kernels, whatever it was loaded with
    cfg = model.cfg
    try:
        targets = parse_targets(cfg, options.targets)
    except ValueError as e:
        raise TrainError(f"skipdecode targets: {e}") from None
    settings = from_settings(SkipDecodeSettings, method_settings(model.name, "skipdecode", options.budget), "skipdecode settings")
    schedule = settings.schedule()
    schedule.check_model(cfg.num_layers)
    schedule_record = {"warmup_layers": schedule.warmup_layers, "layer_counts": list(schedule.layer_counts)}
    run_record = run_settings(model, data, options, budget=schedule_record)  # a preset name -> the schedule it names
    check_resume(out_dir, run, run_record)
    tokenized = load_training_data(data.files, model.tokenizer, data.seq_len, data.max_examples, seed=run.seed)

    scale = options.alpha / options.rank
    params = canonical_layout(model.params)
    first = first_adapted_layer(schedule, cfg.num_layers, options.adapt_layers)
    if options.full_finetune:
        init: dict[str, Any] = {"layers": jax.tree.map(lambda a: jnp.asarray(a[first:]), params["layers"])}
    else:
        init = {"lora": init_lora(jax.random.PRNGKey(run.seed), cfg, options.rank, targets, num_layers=cfg.num_layers - first)}
    loss_fn = functools.partial(
        distillation_loss, cfg=cfg, schedule=schedule, first_layer=first, lora_scale=scale, ce_weight=options.ce_weight,
        response_len=options.response_len, remat=not options.no_remat,
    )
    batch_fn = lambda step: batch_at(tokenized, step, run.batch_size, seed=run.seed)  # noqa: E731
    what = "full fine-tune" if options.full_finetune else f"LoRA rank {options.rank} on {', '.join(targets)}"
    what += f" of layers {first}..{cfg.num_layers - 1}"
    print(
        f"skipdecode {options.budget}: W={schedule.warmup_layers} n={schedule.max_layers}->{schedule.min_layers} over "
        f"{len(schedule.layer_counts) - 1} tokens; {len(tokenized)} sequences of <= {data.seq_len} tokens; {what}",
        file=sys.stderr,
    )
    trained = train(loss_fn, init, {"params": params}, batch_fn, run, out_dir, description=f"skipdecode {options.budget}",
                    progress=progress, settings=run_record)
    log = read_log(out_dir)
    budget_name = os.path.basename(str(options.budget)).removesuffix(".yaml")
    return save_trained(
        options.artifact or os.path.join(out_dir, f"skipdecode-{budget_name}.npz"), jax.tree.map(np.asarray, trained), "skipdecode",
        model, data, out_dir, options, run,
        schedule=schedule_record,
        budget=budget_name, first_layer=first, lora_scale=scale, lora_rank=None if options.full_finetune else options.rank,
        targets=list(targets),
        record={"ce_weight": options.ce_weight, "response_len": options.response_len, "sequences": len(tokenized),
                "final": log[-1] if log else None},
    )


def first_adapted_layer(schedule: SkipSchedule, num_layers: int, adapt: str) -> int:
    """The lowest trained layer: "all" -> 0; "top" -> the first layer a generated token runs above the warm-up."""
    if adapt not in ("top", "all"):
        raise ValueError(f"adapt must be 'top' or 'all', got {adapt!r}")
    return 0 if adapt == "all" else schedule.band(num_layers)[0]


register_trainer("skipdecode", options=SkipDecodeTraining, train=train_skipdecode)
