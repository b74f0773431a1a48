"""`eej train m2r2`: train M2R2's accelerator adapters, fast-stream norm and ARLA (docs/m2r2.md).

    eej train m2r2 --model smollm2-135m --data runs/self_distill.jsonl --out runs/m2r2 \
        --fast-layers 6 --rate 5 --steps 400

The frozen model runs once over the data (the teacher pass, `eej.train.teacher.teacher_cache`):
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

import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from eej.decoding.m2r2 import arla_logits, init_arla, target_depth
from eej.model.lora import init_lora, merge_lora, parse_targets
from eej.model.transformer import embed, linear, mlp, qkv, rms_norm, unstack_layers
from eej.train.data import DataOptions, batch_indices, predicting_positions, prepare_data
from eej.train.loop import TrainConfig, check_resume, evaluate, run_settings, train
from eej.train.teacher import data_fingerprint, distillation_head, teacher_batch, teacher_cache
from eej.train.trainers import Trained, TrainError, check_options, option, register_trainer, save_trained
from eej.weights.registry import Model, with_kernels


@dataclasses.dataclass(frozen=True)
class M2R2Training:
    """`eej train m2r2`'s options (see the module docstring)."""

    fast_layers: int = option(6, "K: the fast stream runs the first K layers with adapters", at_least=1, integer=True)
    rate: float = option(5.0, "R: fast layer k is aligned to slow depth min(round(R k), N)", at_least=1.0)
    rank: int = option(16, "accelerator adapter (LoRA) rank", at_least=1, integer=True)
    targets: str | None = option(None, "adapted projections, comma-separated (default: all of "
                                 "wq,wk,wv,wo,w_gate,w_up,w_down; wq,wk,wv,wo on a mixture-of-experts model)")
    draft_vocab: int = option(8192, "V': distillation over the most frequent answer tokens (0 = all)", at_least=0, integer=True)
    positions: int = option(512, "predicting positions per batch whose distributions are matched", at_least=1, integer=True)
    align_weight: float = option(1.0)
    mid_weight: float = option(0.5, "weight of the distillation at fast layers k < K")
    arla_weight: float = option(1.0)
    arla_dim: int = option(32, at_least=1, integer=True)
    teacher_cache: str | None = option(None, "directory of cached frozen-model states (default OUT/teacher)",
                                       result=False)
    teacher_batch_size: int = option(8, at_least=1, integer=True, result=False)
    eval_fraction: float = option(0.05, "held-out share of the data for the final report")
    artifact: str | None = option(None, "artifact path (default OUT/m2r2.npz)", result=False)

    def __post_init__(self) -> None:
        check_options(self, "m2r2")
        if not 0 <= self.eval_fraction < 1:
            raise TrainError(f"m2r2 eval_fraction must be in [0, 1), got {self.eval_fraction}")


# ----------------------------------------------------------------------------- the fast stream, teacher-forced


def shared_kv_block(fast_layer: dict, base_layer: dict, x: jax.Array, slow_in: jax.Array, positions: jax.Array, cfg) -> jax.Array:
    """One fast layer over whole sequences with the slow stream's KV shared (training form).

    x: fast residual [B, T, D] entering the layer; slow_in: slow residual [B, T, D] entering the same
    base layer. Token t attends to the slow keys/values (base weights on slow_in) of positions < t
    and to its own fast key/value (adapted weights on x). Returns the fast residual after the layer.
    """
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


# ----------------------------------------------------------------------------- loss


def m2r2_loss(trainable, frozen, batch, *, cfg, num_fast: int, targets, lora_scale: float,
              align_weight: float, mid_weight: float, arla_weight: float):
    """The training loss (module docstring); metrics: acceptance/top-1 of the K-layer draft, ARLA accuracy."""
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


# ----------------------------------------------------------------------------- training


def train_m2r2(model: Model, data: DataOptions, out_dir: str, options: M2R2Training, run: TrainConfig,
               progress: bool = True) -> Trained:
    """Train M2R2's fast stream (accelerator LoRA, its norm, ARLA) for `model` on `data`; writes the artifact."""
    model = with_kernels(model, "xla")  # gradients and teacher states through XLA's kernels, whatever it was loaded with
    cfg = model.cfg
    num_fast, lora_scale = options.fast_layers, 1.0
    if num_fast > cfg.num_layers:
        raise TrainError(f"m2r2 fast_layers must be in [1, {cfg.num_layers}] for {cfg.name}, got {num_fast}")
    try:
        targets_proj = parse_targets(cfg, options.targets)
    except ValueError as e:
        raise TrainError(f"m2r2 targets: {e}") from None
    settings = run_settings(model, data, options)
    check_resume(out_dir, run, settings)

    tokenized, train_rows, eval_rows, ranking = prepare_data(model, data, options.eval_fraction, run.seed)
    head, vocab_size = distillation_head(model, ranking, options.draft_vocab)
    targets = [target_depth(k, options.rate, cfg.num_layers) for k in range(1, num_fast + 1)]  # tau(1..K)
    depths = sorted(set(range(1, num_fast)) | set(targets))  # and the slow states whose K/V the fast stream reads
    teacher = teacher_cache(model, tokenized, depths, options.teacher_cache or os.path.join(out_dir, "teacher"),
                            options.teacher_batch_size, data_fingerprint(model, data, run.seed, len(tokenized)), progress)
    predicting = predicting_positions(tokenized.loss_mask)
    frozen = {"layers": tuple(unstack_layers(model.params["layers"])[:num_fast]), "embed": model.params["embed"],
              "head": head, "final_norm": model.params["final_norm"]}
    init = {
        "lora": init_lora(jax.random.PRNGKey(run.seed), cfg, options.rank, targets_proj, num_layers=num_fast),
        "norm": jnp.asarray(model.params["final_norm"], jnp.float32),
        "arla": jax.tree.map(jnp.asarray, init_arla(cfg, num_fast, dim=options.arla_dim, hidden=2 * options.arla_dim, seed=run.seed)),
    }

    def batch_for(rows: np.ndarray, positions: int, rng: np.random.Generator) -> dict:
        """`teacher_batch` with the sequences' tokens [B, T] and real-token mask [B, T]."""
        real = (np.arange(tokenized.tokens.shape[1])[None] < tokenized.lengths[rows][:, None]).astype(np.float32)
        batch = teacher_batch(teacher, predicting, rows, depths, cfg.num_layers, positions, rng)
        return {**batch, "tokens": tokenized.tokens[rows], "real": real}

    def batch_fn(step: int) -> dict:
        rows = np.sort(train_rows[batch_indices(len(train_rows), step, run.batch_size, run.seed)])
        return batch_for(rows, options.positions, np.random.default_rng([run.seed, step]))

    loss_fn = functools.partial(
        m2r2_loss, cfg=cfg, num_fast=num_fast, targets=tuple(targets), lora_scale=lora_scale,
        align_weight=options.align_weight, mid_weight=options.mid_weight, arla_weight=options.arla_weight,
    )
    trained = train(loss_fn, init, frozen, batch_fn, run, out_dir, description=f"m2r2 K={num_fast} R={options.rate:g}",
                    progress=progress, settings=settings)
    held_out = evaluate(loss_fn, trained, frozen, batch_for, predicting, eval_rows, run.batch_size) if len(eval_rows) else {}
    if held_out:
        print(f"held-out: {json.dumps(held_out)}", file=sys.stderr)
    return save_trained(
        options.artifact or os.path.join(out_dir, "m2r2.npz"), {**jax.tree.map(np.asarray, trained), "vocab_rank": ranking},
        "m2r2", model, data, out_dir, options, run,
        settings={"fast_layers": num_fast, "rate": options.rate, "rank": options.rank, "lora_scale": lora_scale,
                  "targets": list(targets_proj), "target_depths": targets, "draft_vocab": vocab_size},
        held_out=held_out, record={"sequences": int(len(train_rows))},
    )


register_trainer("m2r2", options=M2R2Training, train=train_m2r2)
