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

import argparse
import functools
import os
import shlex
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from eej.config import ModelConfig
from eej.decoding.skipdecode import SkipDecodeSettings, SkipSchedule
from eej.model.cache import init_cache
from eej.model.lora import PROJECTIONS, init_lora, merge_lora
from eej.model.transformer import Params, block, canonical_layout, embed, logits_from_hidden, run_layers, stack_layers
from eej.train.loop import masked_mean


def prompt_lengths(loss_mask: jax.Array) -> jax.Array:
    """P per row [B]: the first assistant position of `loss_mask` [B, T] (rows without one: T)."""
    has = jnp.any(loss_mask > 0, axis=1)
    return jnp.where(has, jnp.argmax(loss_mask > 0, axis=1), loss_mask.shape[1]).astype(jnp.int32)


def skip_hidden(
    params: Params, tokens: jax.Array, prompt_lens: jax.Array, schedule: SkipSchedule, cfg: ModelConfig, remat: bool = True
) -> jax.Array:
    """The skip model's last residual stream [B, T, D] over right-padded sequences `tokens` [B, T].

    prompt_lens [B]: P per row; token p runs the layers of generation index p - P.
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    active = schedule.active_mask(positions - prompt_lens[:, None], cfg.num_layers)  # [B, T, L]
    empty = init_cache(cfg, b, t, num_layers=1)

    def layer_step(x, inputs):
        layer, keep = inputs
        y, _, _ = block(layer, x, empty.k[0], empty.v[0], positions, cfg)
        return jnp.where(keep[..., None], y, x), None

    if remat:
        layer_step = jax.checkpoint(layer_step)
    x, _ = lax.scan(layer_step, embed(params, tokens, cfg), (stack_layers(params["layers"]), jnp.moveaxis(active, 2, 0)))
    return x


def full_hidden(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The full model's last residual stream [B, T, D] (the teacher)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x, _ = run_layers(params, embed(params, tokens, cfg), init_cache(cfg, b, t), positions, cfg)
    return x


def distillation_loss(
    trainable: dict[str, Any],
    frozen: dict[str, Any],
    batch: dict[str, jax.Array],
    *,
    cfg: ModelConfig,
    schedule: SkipSchedule,
    lora_scale: float,
    ce_weight: float,
    remat: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KL(teacher || skip student) (+ ce_weight x CE) on assistant targets; -> (loss, metrics).

    trainable: {"lora": adapters} or {"layers": stacked layers} (full fine-tune).
    frozen: {"params": the base model (stacked layers)}.
    batch: tokens [B, T] int32, loss_mask [B, T] (1 on assistant tokens).
    """
    base = frozen["params"]
    if "lora" in trainable:
        student = merge_lora(base, trainable["lora"], scale=lora_scale)
    else:
        student = {**base, "layers": trainable["layers"]}
    tokens, mask = batch["tokens"], batch["loss_mask"]
    prompt_lens = prompt_lengths(mask)
    # Position p predicts token p + 1: score positions whose next token is an assistant token.
    target_mask = mask[:, 1:]
    student_logits = logits_from_hidden(student, skip_hidden(student, tokens, prompt_lens, schedule, cfg, remat)[:, :-1], cfg)
    teacher_logits = lax.stop_gradient(logits_from_hidden(base, full_hidden(base, tokens, cfg)[:, :-1], cfg))
    log_p = jax.nn.log_softmax(teacher_logits, axis=-1)
    log_q = jax.nn.log_softmax(student_logits, axis=-1)
    kl = masked_mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1), target_mask)
    ce = masked_mean(-jnp.take_along_axis(log_q, tokens[:, 1:, None], axis=-1)[..., 0], target_mask)
    agree = masked_mean((jnp.argmax(log_q, -1) == jnp.argmax(log_p, -1)).astype(jnp.float32), target_mask)
    return kl + ce_weight * ce, {"kl": kl, "ce": ce, "agree": agree}


# ----------------------------------------------------------------------------- eej train skipdecode


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", required=True, help="a skipdecode preset of the model's config (2x, 3x, ...) or a settings FILE.yaml")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA scale = alpha / rank")
    p.add_argument("--targets", default=",".join(PROJECTIONS), help="comma-separated projections to adapt")
    p.add_argument("--full-finetune", action="store_true", help="train every layer weight instead of LoRA")
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of cross-entropy on the reference responses")
    p.add_argument("--no-remat", action="store_true", help="keep activations instead of recomputing them (more memory)")
    p.add_argument("--artifact", default=None, help="where to write the trained artifact (default: OUT/skipdecode-BUDGET.npz)")


def _run(args: argparse.Namespace) -> int:
    from eej.cli import CliError
    from eej.presets import PresetError, from_settings, method_settings
    from eej.train.artifacts import save_artifact
    from eej.train.cli import train_config_from_args
    from eej.train.data import DataError, batch_at, load_training_data
    from eej.train.loop import read_log, to_numpy_tree, train
    from eej.weights.registry import load_model

    if args.rank < 1:
        raise CliError(f"--rank must be >= 1, got {args.rank}")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    bad = [t for t in targets if t not in PROJECTIONS]
    if bad or not targets:
        raise CliError(f"unknown --targets {', '.join(bad) or '(none)'}; choose from {', '.join(PROJECTIONS)}")
    model = load_model(args.model, layout="stacked")
    cfg = model.cfg
    try:
        settings = from_settings(SkipDecodeSettings, method_settings(model.name, "skipdecode", args.budget), "skipdecode settings")
        schedule = settings.schedule()
        schedule.check_model(cfg.num_layers)
    except (PresetError, ValueError) as e:
        raise CliError(str(e)) from None
    try:
        data = load_training_data(args.data, model.tokenizer, args.seq_len, args.max_examples, seed=args.seed)
    except DataError as e:
        raise CliError(str(e)) from None

    scale = args.alpha / args.rank
    if args.full_finetune:
        init: dict[str, Any] = {"layers": jax.tree.map(jnp.asarray, model.params["layers"])}
    else:
        init = {"lora": init_lora(jax.random.PRNGKey(args.seed), cfg, args.rank, targets)}
    loss_fn = functools.partial(
        distillation_loss, cfg=cfg, schedule=schedule, lora_scale=scale, ce_weight=args.ce_weight,
        remat=not args.no_remat,
    )
    config = train_config_from_args(args)
    batch_fn = lambda step: batch_at(data, step, args.batch_size, seed=args.seed)  # noqa: E731
    what = "full fine-tune" if args.full_finetune else f"LoRA rank {args.rank} on {', '.join(targets)}"
    print(
        f"skipdecode {args.budget}: W={schedule.warmup_layers} n={schedule.max_layers}->{schedule.min_layers} over "
        f"{len(schedule.layer_counts) - 1} tokens; {len(data)} sequences of <= {args.seq_len} tokens; "
        f"{what}",
        file=sys.stderr,
    )
    trained = train(
        loss_fn, init, {"params": canonical_layout(model.params)}, batch_fn, config, args.out,
        description=f"skipdecode {args.budget}", progress=not args.no_progress,
    )
    log = read_log(args.out)
    budget_name = os.path.basename(str(args.budget)).removesuffix(".yaml")
    path = args.artifact or os.path.join(args.out, f"skipdecode-{budget_name}.npz")
    save_artifact(
        path,
        to_numpy_tree(trained),
        "skipdecode",
        cfg,
        schedule={"warmup_layers": schedule.warmup_layers, "layer_counts": list(schedule.layer_counts)},
        budget=budget_name,
        lora_scale=scale,
        lora_rank=None if args.full_finetune else args.rank,
        targets=list(targets),
        train={
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
            "ce_weight": args.ce_weight, "sequences": len(data), "final": log[-1] if log else None,
        },
        reproduce=reproduce_command(args),
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0


def reproduce_command(args: argparse.Namespace) -> str:
    """The `eej train skipdecode` command line that repeats this run."""
    parts = ["eej", "train", "skipdecode", "--model", args.model, "--budget", str(args.budget), "--data", *args.data]
    options = [
        ("--out", args.out), ("--steps", args.steps), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len),
        ("--lr", args.lr), ("--warmup", args.warmup), ("--max-examples", args.max_examples), ("--seed", args.seed),
        ("--rank", args.rank), ("--alpha", args.alpha), ("--targets", args.targets), ("--ce-weight", args.ce_weight),
        ("--artifact", args.artifact),
    ]
    for flag, value in options:
        if value is not None:
            parts += [flag, str(value)]
    parts += [flag for flag, on in (("--full-finetune", args.full_finetune), ("--no-remat", args.no_remat)) if on]
    return " ".join(shlex.quote(p) for p in parts)


def _register() -> None:
    from eej.train.cli import register_trainer

    register_trainer("skipdecode", _add_arguments, _run)


_register()
