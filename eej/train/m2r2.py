"""`eej train m2r2`: train M2R2's accelerator adapters, fast-stream norm and ARLA (docs/m2r2.md).

    eej train m2r2 --model smollm2-135m --data runs/self_distill.jsonl --out runs/m2r2 \
        --fast-layers 6 --rate 5 --steps 400

The frozen model runs once over the data (the teacher pass, `eej.train.kangaroo.teacher_cache`):
the slow residuals entering fast layers 1..K-1 (their K/V is what the fast stream reads: shared
KV), the slow residuals at the target depths tau(k) = round(R k), and the final layer's state and
log-normaliser. Each step runs the fast stream over whole sequences with teacher-forced shared KV:
at layer j a token's query reads the slow stream's keys/values of the earlier positions and its
own fast key/value — exactly what decoding does for the first token of a step.

Loss = align_weight * sum_k ||f_k - h_tau(k)||^2 / ||h_tau(k)||^2 (mean over real tokens)
     + CE(p, q_K) + mid_weight * mean_{k<K} CE(p, q_k)      (soft cross-entropy, draft vocabulary)
     + arla_weight * BCE(ARLA_k, [argmax q_k == argmax p])   (ARLA reads the trajectory stop-gradient)
where p is the frozen model's next-token distribution and q_k the fast prediction after k layers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np

from eej.cli.parser import CliError
from eej.cli.train import register_trainer
from eej.train.data import sample_positions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast-layers", type=int, default=6, help="K: the fast stream runs the first K layers with adapters")
    p.add_argument("--rate", type=float, default=5.0, help="R: fast layer k is aligned to slow depth min(round(R k), N)")
    p.add_argument("--rank", type=int, default=16, help="accelerator adapter (LoRA) rank")
    p.add_argument("--targets", default=None, help="adapted projections, comma-separated (default: all of "
                   "wq,wk,wv,wo,w_gate,w_up,w_down; wq,wk,wv,wo on a mixture-of-experts model)")
    p.add_argument("--draft-vocab", type=int, default=8192, help="V': distillation over the most frequent answer tokens (0 = all)")
    p.add_argument("--positions", type=int, default=512, help="predicting positions per batch whose distributions are matched")
    p.add_argument("--align-weight", type=float, default=1.0)
    p.add_argument("--mid-weight", type=float, default=0.5, help="weight of the distillation at fast layers k < K")
    p.add_argument("--arla-weight", type=float, default=1.0)
    p.add_argument("--arla-dim", type=int, default=32)
    p.add_argument("--teacher-cache", default=None, help="directory of cached frozen-model states (default OUT/teacher)")
    p.add_argument("--teacher-batch-size", type=int, default=8)
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of the data for the final report")
    p.add_argument("--artifact", default=None, help="artifact path (default OUT/m2r2.npz)")


# ----------------------------------------------------------------------------- the fast stream, teacher-forced


def shared_kv_block(fast_layer: dict, base_layer: dict, x: jax.Array, slow_in: jax.Array, positions: jax.Array, cfg) -> jax.Array:
    """One fast layer over whole sequences with the slow stream's KV shared (training form).

    x: fast residual [B, T, D] entering the layer; slow_in: slow residual [B, T, D] entering the same
    base layer. Token t attends to the slow keys/values (base weights on slow_in) of positions < t
    and to its own fast key/value (adapted weights on x). Returns the fast residual after the layer.
    """
    from eej.model.transformer import linear, mlp, qkv

    b, t, _ = x.shape
    hkv, g, dh = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    q, k_fast, v_fast = qkv(fast_layer, x, positions, cfg)
    _, k_slow, v_slow = qkv(base_layer, slow_in, positions, cfg)
    q = q.reshape(b, t, hkv, g, dh).astype(jnp.float32) * dh**-0.5
    earlier = jnp.einsum("btkgd,bskd->bkgts", q, k_slow.astype(jnp.float32))
    own = jnp.einsum("btkgd,btkd->bkgt", q, k_fast.astype(jnp.float32))
    pos_q, pos_k = positions[:, None, None, :, None], positions[:, None, None, None, :]
    allowed = pos_k < pos_q
    if cfg.sliding_window is not None:
        allowed &= pos_k > pos_q - cfg.sliding_window
    scores = jnp.concatenate([jnp.where(allowed, earlier, -jnp.inf), own[..., None]], axis=-1)
    w = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", w[..., :t], v_slow.astype(jnp.float32))
    out = out + w[..., t].transpose(0, 3, 1, 2)[..., None] * v_fast.astype(jnp.float32)[:, :, :, None]
    x = x + linear(out.reshape(b, t, cfg.num_heads * dh).astype(x.dtype), fast_layer["wo"])
    return mlp(fast_layer, x, cfg)


def fast_stream_teacher_forced(fast_layers, base_layers, x0: jax.Array, slow_inputs, positions, cfg) -> list[jax.Array]:
    """[f_1, ..., f_K] for whole sequences: x0 [B, T, D] embeddings, slow_inputs[j] the slow residual
    entering layer j (slow_inputs[0] = x0)."""
    x, out = x0, []
    for j, (fast, base) in enumerate(zip(fast_layers, base_layers)):
        x = shared_kv_block(fast, base, x, slow_inputs[j], positions, cfg)
        out.append(x)
    return out


# ----------------------------------------------------------------------------- batches and loss


def teacher_depths(num_fast: int, rate: float, num_layers: int) -> tuple[list[int], list[int]]:
    """(slow depths whose K/V the fast stream reads: 1..K-1, target depths tau(1..K))."""
    from eej.decoding.m2r2 import target_depth

    return list(range(1, num_fast)), [target_depth(k, rate, num_layers) for k in range(1, num_fast + 1)]


def make_batch(data, teacher: dict, predicting: np.ndarray, rows: np.ndarray, kv_depths, targets, final_layer: int,
               num_positions: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Whole sequences `rows` (tokens, slow states, real-token mask) and `num_positions` predicting
    positions (sampled if more, zero-weighted padding if fewer) with their teacher distributions."""
    rows = np.asarray(rows)
    b_idx, t_idx, real = sample_positions(predicting[rows], num_positions, rng)
    weight = (np.arange(num_positions) < real).astype(np.float32)
    t = data.tokens.shape[1]
    real = (np.arange(t)[None] < data.lengths[rows][:, None]).astype(np.float32)
    out = {"tokens": data.tokens[rows], "real": real, "b": b_idx, "t": t_idx, "weight": weight}
    for d in sorted(set(kv_depths) | set(targets)):
        out[f"h{d}"] = np.asarray(teacher[f"h{d}"][rows])
    out["h_final"] = np.asarray(teacher[f"h{final_layer}"][rows])[b_idx, t_idx]
    out["lse"] = np.asarray(teacher["lse"][rows])[b_idx, t_idx]
    return out


def m2r2_loss(trainable, frozen, batch, *, cfg, num_fast: int, targets, lora_scale: float,
              align_weight: float, mid_weight: float, arla_weight: float):
    """The training loss (module docstring); metrics: acceptance/top-1 of the K-layer draft, ARLA accuracy."""
    from eej.decoding.m2r2 import arla_logits
    from eej.model.lora import merge_lora
    from eej.model.transformer import embed, linear, rms_norm

    base = frozen["layers"]
    fast = merge_lora({"layers": base}, trainable["lora"], lora_scale)["layers"]
    tokens = batch["tokens"]
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x0 = embed(frozen, tokens, cfg).astype(jnp.float32)
    slow = [x0] + [batch[f"h{j}"].astype(jnp.float32) for j in range(1, num_fast)]
    states = fast_stream_teacher_forced(fast, base, x0, slow, positions, cfg)

    real = batch["real"]
    n_real = jnp.maximum(jnp.sum(real), 1.0)
    align = []
    for f, d in zip(states, targets):
        h = batch[f"h{d}"].astype(jnp.float32)
        err = jnp.sum((f - h) ** 2, -1) / jnp.maximum(jnp.sum(h * h, -1), 1e-6)
        align.append(jnp.sum(err * real) / n_real)

    w = batch["weight"]
    total = jnp.maximum(jnp.sum(w), 1.0)
    head = frozen["head"]
    t_logits = linear(rms_norm(batch["h_final"].astype(jnp.float32), frozen["final_norm"], cfg.rms_eps), head).astype(jnp.float32)
    p = jnp.exp(t_logits - batch["lse"][:, None])
    target_top = jnp.argmax(t_logits, -1)
    ce, top1 = [], []
    trajectory = jnp.stack([f[batch["b"], batch["t"]] for f in states], axis=1)  # [M, K, D]
    for k in range(num_fast):
        log_q = jax.nn.log_softmax(linear(rms_norm(trajectory[:, k], trainable["norm"], cfg.rms_eps), head).astype(jnp.float32), -1)
        ce.append(-jnp.sum(w * jnp.sum(p * log_q, -1)) / total)
        top1.append(jnp.argmax(log_q, -1) == target_top)
    labels = jax.lax.stop_gradient(jnp.stack(top1, axis=1).astype(jnp.float32))  # [M, K]
    exit_logits = arla_logits(trainable["arla"], jax.lax.stop_gradient(trajectory), cfg)
    bce = jnp.sum(w[:, None] * (jax.nn.softplus(exit_logits) - labels * exit_logits)) / (total * num_fast)
    arla_acc = jnp.sum(w[:, None] * ((exit_logits > 0) == (labels > 0.5))) / (total * num_fast)

    mid = jnp.mean(jnp.stack(ce[:-1])) if num_fast > 1 else 0.0
    loss = align_weight * sum(align) + ce[-1] + mid_weight * mid + arla_weight * bce
    log_q_last = jax.nn.log_softmax(linear(rms_norm(trajectory[:, -1], trainable["norm"], cfg.rms_eps), head).astype(jnp.float32), -1)
    accept = jnp.sum(w * jnp.sum(jnp.minimum(p, jnp.exp(log_q_last)), -1)) / total
    metrics = {"align": sum(align) / num_fast, "ce": ce[-1], "accept": accept,
               "top1": jnp.sum(w * top1[-1]) / total, "arla_bce": bce, "arla_acc": arla_acc}
    for k in range(num_fast - 1):
        metrics[f"top1_{k + 1}"] = jnp.sum(w * top1[k]) / total
    return loss, metrics


# ----------------------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    from eej.decoding.m2r2 import init_arla
    from eej.model.lora import init_lora, parse_targets
    from eej.model.transformer import unstack_layers
    from eej.weights.artifacts import save_artifact
    from eej.cli.train import train_config_from_args
    from eej.train.data import batch_indices
    from eej.train.kangaroo import data_fingerprint, predicting_positions, prepare_data, teacher_cache
    from eej.train.loop import train
    from eej.weights.registry import load_model

    model = load_model(args.model)
    cfg = model.cfg
    if not 1 <= args.fast_layers <= cfg.num_layers:
        raise CliError(f"--fast-layers must be in [1, {cfg.num_layers}] for {cfg.name}, got {args.fast_layers}")
    if args.rate < 1.0:
        raise CliError(f"--rate must be >= 1 (the fast stream runs ahead, not behind), got {args.rate}")
    try:
        targets_proj = parse_targets(cfg, args.targets)
    except ValueError as e:
        raise CliError(f"--targets: {e}") from None
    if args.rank < 1 or args.positions < 1 or args.draft_vocab < 0 or not 0 <= args.eval_fraction < 1:
        raise CliError("--rank and --positions must be >= 1, --draft-vocab >= 0 and --eval-fraction in [0, 1)")
    config = train_config_from_args(args)
    num_fast = args.fast_layers
    lora_scale = 1.0

    data, train_rows, eval_rows, ranking = prepare_data(model, args)
    vocab = ranking[: args.draft_vocab] if args.draft_vocab else None
    kv_depths, targets = teacher_depths(num_fast, args.rate, cfg.num_layers)
    teacher = teacher_cache(
        model, data, sorted(set(kv_depths) | set(targets)), args.teacher_cache or os.path.join(args.out, "teacher"),
        args.teacher_batch_size, data_fingerprint(model, data, args), progress=not args.no_progress,
    )
    predicting = predicting_positions(data.loss_mask)
    head = model.params["lm_head"] if vocab is None else jnp.take(model.params["lm_head"], jnp.asarray(vocab), axis=1)
    frozen = {"layers": tuple(unstack_layers(model.params["layers"])[:num_fast]), "embed": model.params["embed"],
              "head": head, "final_norm": model.params["final_norm"]}
    init = {
        "lora": init_lora(jax.random.PRNGKey(args.seed), cfg, args.rank, targets_proj, num_layers=num_fast),
        "norm": jnp.asarray(model.params["final_norm"], jnp.float32),
        "arla": jax.tree.map(jnp.asarray, init_arla(cfg, num_fast, dim=args.arla_dim, hidden=2 * args.arla_dim, seed=args.seed)),
    }

    def batch_for(rows, n_positions, rng):
        return make_batch(data, teacher, predicting, rows, kv_depths, targets, cfg.num_layers, n_positions, rng)

    def batch_fn(step: int) -> dict:
        rows = np.sort(train_rows[batch_indices(len(train_rows), step, config.batch_size, args.seed)])
        return batch_for(rows, args.positions, np.random.default_rng([args.seed, step]))

    loss_fn = functools.partial(
        m2r2_loss, cfg=cfg, num_fast=num_fast, targets=tuple(targets), lora_scale=lora_scale,
        align_weight=args.align_weight, mid_weight=args.mid_weight, arla_weight=args.arla_weight,
    )
    trained = train(loss_fn, init, frozen, batch_fn, config, args.out, description=f"m2r2 K={num_fast} R={args.rate:g}",
                    progress=not args.no_progress)
    held_out = evaluate(loss_fn, trained, frozen, batch_for, predicting, eval_rows, args.batch_size) if len(eval_rows) else {}
    if held_out:
        print(f"held-out: {json.dumps(held_out)}", file=sys.stderr)

    artifact = args.artifact or os.path.join(args.out, "m2r2.npz")
    argv = sys.argv[1:]
    argv = argv[argv.index("m2r2") + 1 :] if "m2r2" in argv else argv
    save_artifact(
        artifact, {**jax.tree.map(np.asarray, trained), "vocab_rank": ranking}, "m2r2", cfg,
        settings={"fast_layers": num_fast, "rate": args.rate, "rank": args.rank, "lora_scale": lora_scale,
                  "targets": list(targets_proj), "target_depths": targets, "draft_vocab": int(len(vocab)) if vocab is not None else 0},
        reproduce="eej train m2r2 " + " ".join(shlex.quote(a) for a in argv), held_out=held_out,
        train={"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
               "sequences": int(len(train_rows)), "data": [os.path.basename(p) for p in args.data]},
    )
    print(f"wrote {artifact}", file=sys.stderr)
    return 0


def evaluate(loss_fn, trained, frozen, batch_for, predicting, rows, batch_size: int) -> dict[str, float]:
    """Metrics averaged over every predicting position of `rows`."""
    step = jax.jit(loss_fn)
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    size = max(1, max(int(predicting[c].sum()) for c in chunks))
    totals: dict[str, float] = {}
    weight = 0.0
    for chunk in chunks:
        n = int(predicting[chunk].sum())
        batch = batch_for(chunk, size, np.random.default_rng(0))
        loss, metrics = step(trained, frozen, batch)
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
        weight += n
    return {k: round(v / max(weight, 1.0), 5) for k, v in totals.items()}


register_trainer("m2r2", add_arguments, run)
