"""`eej train moefy`: split a dense model's FFNs into experts and train a router per layer (eej.experts.moefy).

1. Teacher pass: the dense model's normed MLP inputs h_l [N, D] at every layer on sample tokens of the
   training text (assistant and prompt tokens alike: a router sees both at inference).
2. Partition: per layer, balanced k-means of the F neurons by co-activation on `--cluster-tokens` tokens.
3. Labels: per token and layer, the k most important experts (norm of each expert's exact output).
4. Routers W_r [L, D, E]: binary cross-entropy against those labels (AdamW, eej.train.loop: orbax
   checkpoints, resume, progress bar).
5. Held-out report: router recall@k (the share of the true top-k experts the router picks) per layer, and
   the MoE model's teacher-forced top-1 agreement with the dense model for a sweep of k.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from eej.experts.moefy import METHOD, activations, check_split, expert_scores, host_layers, mlp_inputs, moefy_model, partition_layer
from eej.train.data import DataOptions, TokenizedData, load_training_data, split
from eej.train.loop import TrainConfig, check_resume, run_settings, train
from eej.train.teacher import teacher_argmax
from eej.train.trainers import Trained, TrainError, check_options, option, parse_numbers, register_trainer, save_trained
from eej.weights.registry import Model, with_kernels


@dataclasses.dataclass(frozen=True)
class MoefyTraining:
    """`eej train moefy`'s options (see the module docstring)."""

    experts: int = option(16, "experts per layer E (must divide the FFN width)")
    top_k: int = option(4, "experts per token k: the labels' k and the shipped default")
    router_tokens: int = option(16384, "training tokens for the routers", at_least=1, integer=True)
    cluster_tokens: int = option(4096, "tokens whose activations drive the clustering", at_least=1, integer=True)
    eval_fraction: float = option(0.1)
    sweep: str = option("1,2,3,4,6,8,12,16", "comma-separated k values for the held-out agreement report", result=False)
    artifact: str | None = option(None, "where to write the artifact (default OUT/moefy.npz)", result=False)

    def __post_init__(self) -> None:
        check_options(self, "moefy")


def _token_rows(data, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, position) pairs of `count` real (non-padding) tokens, sampled without replacement."""
    seq = np.concatenate([np.full(n, i) for i, n in enumerate(data.lengths)])
    pos = np.concatenate([np.arange(n) for n in data.lengths])
    pick = rng.choice(len(seq), size=min(count, len(seq)), replace=False)
    return seq[pick], pos[pick]


def collect_mlp_inputs(model: Model, tokens: np.ndarray, seqs: np.ndarray, positions: np.ndarray, batch_size: int, progress: bool) -> np.ndarray:
    """h_l at the chosen (sequence, position) pairs: -> [L, N, D] float32."""
    from tqdm.auto import tqdm

    cfg = model.cfg
    needed = np.unique(seqs)
    where = {s: i for i, s in enumerate(needed)}
    out = np.zeros((cfg.num_layers, len(seqs), cfg.hidden_size), np.float32)
    for start in tqdm(range(0, len(needed), batch_size), desc="teacher pass", disable=not progress):
        chunk = needed[start : start + batch_size]
        batch = tokens[chunk]
        if len(chunk) < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(chunk), axis=0)])
        h = np.asarray(mlp_inputs(model.params, jnp.asarray(batch), cfg))  # [L, B, T, D]
        rows = np.nonzero(np.isin(seqs, chunk))[0]
        local = np.array([where[s] - start for s in seqs[rows]])
        out[:, rows] = h[:, local, positions[rows]]
    return out


def agreement_sweep(dense: Model, moe_model: Model, data: TokenizedData, ks: list[int]) -> dict[str, float]:
    """Teacher-forced top-1 agreement of the MoE model with the dense model on `data`'s real tokens, per k."""
    tokens = jnp.asarray(data.tokens)
    mask = np.arange(data.tokens.shape[1])[None, :] < data.lengths[:, None]
    ref = np.concatenate([np.asarray(teacher_argmax(dense.params, tokens[i : i + 8], dense.cfg)) for i in range(0, len(tokens), 8)])
    out = {}
    for k in ks:
        cfg = moe_model.cfg.replace(experts_per_token=k)
        got = np.concatenate([np.asarray(teacher_argmax(moe_model.params, tokens[i : i + 8], cfg)) for i in range(0, len(tokens), 8)])
        out[str(k)] = round(float(np.mean((got == ref)[mask])), 5)
    return out


def train_moefy(model: Model, data: DataOptions, out_dir: str, options: MoefyTraining, run: TrainConfig,
                progress: bool = True) -> Trained:
    """Split `model`'s FFNs into experts, train a router per layer and report held-out agreement; writes the artifact."""
    model = with_kernels(model, "xla")  # gradients and teacher states through XLA's kernels, whatever it was loaded with
    cfg = model.cfg
    width = check_split(cfg, options.experts, options.top_k)
    sweep = sorted(set(parse_numbers(options.sweep, int, "moefy sweep")) | {options.top_k})
    if not all(1 <= k <= options.experts for k in sweep):
        raise TrainError(f"moefy sweep values must be in [1, {options.experts}]")
    settings = run_settings(model, data, options)
    check_resume(out_dir, run, settings)
    tokenized = load_training_data(data.files, model.tokenizer, data.seq_len, data.max_examples, run.seed)
    train_data, held = split(tokenized, options.eval_fraction, run.seed)
    rng = np.random.default_rng(run.seed)
    seqs, pos = _token_rows(train_data, options.router_tokens, rng)
    h = collect_mlp_inputs(model, train_data.tokens, seqs, pos, 8, progress)  # [L, N, D]
    hseqs, hpos = _token_rows(held, max(1024, options.router_tokens // 8), rng)
    h_held = collect_mlp_inputs(model, held.tokens, hseqs, hpos, 8, progress)

    dense = host_layers(model)
    started = time.time()
    partition = np.zeros((cfg.num_layers, options.experts, width), np.int32)
    labels = np.zeros((cfg.num_layers, h.shape[1], options.experts), np.float32)
    labels_held = np.zeros((cfg.num_layers, h_held.shape[1], options.experts), np.float32)
    for layer in range(cfg.num_layers):
        wg, wu, wd = (jnp.asarray(dense[n][layer]) for n in ("w_gate", "w_up", "w_down"))
        mags = np.abs(np.asarray(activations(wg, wu, jnp.asarray(h[layer, : options.cluster_tokens]))))
        partition[layer] = partition_layer(mags, options.experts, seed=run.seed + layer)
        for hs, lab in ((h, labels), (h_held, labels_held)):
            scores = np.asarray(expert_scores(wg, wu, wd, jnp.asarray(partition[layer]), jnp.asarray(hs[layer])))
            top = np.argsort(-scores, axis=1)[:, : options.top_k]
            np.put_along_axis(lab[layer], top, 1.0, axis=1)
    print(f"partitioned {cfg.num_layers} layers into {options.experts} experts of {width} neurons in {time.time() - started:.0f} s",
          file=sys.stderr)

    k = options.top_k
    frozen = {"h": jnp.asarray(h), "labels": jnp.asarray(labels)}

    def recall_at_k(logits, lab):
        top = jax.lax.top_k(logits, k)[1]
        return jnp.mean(jnp.sum(jnp.take_along_axis(lab, top, axis=-1), axis=-1) / k)

    def loss_fn(params, frozen, batch):
        hb = jnp.take(frozen["h"], batch["rows"], axis=1)  # [L, b, D]
        lb = jnp.take(frozen["labels"], batch["rows"], axis=1)
        logits = jnp.einsum("lnd,lde->lne", hb, params["router"])
        bce = jnp.mean(jnp.logaddexp(0.0, logits) - lb * logits)
        return bce, {"recall": recall_at_k(logits, lb)}

    n = h.shape[1]

    def batch_fn(step: int) -> dict:
        return {"rows": jnp.asarray(np.random.default_rng((run.seed, step)).choice(n, run.batch_size, replace=False))}

    init = {"router": jnp.asarray(np.random.default_rng(run.seed).standard_normal((cfg.num_layers, cfg.hidden_size, options.experts)).astype(np.float32) * 0.01)}
    params = train(loss_fn, init, frozen, batch_fn, run, out_dir, description=f"moefy E={options.experts} k={k}",
                   progress=progress, settings=settings)
    router = np.asarray(params["router"], np.float32)

    held_logits = np.einsum("lnd,lde->lne", h_held, router)
    top = np.argsort(-held_logits, axis=-1)[..., :k]
    recall = np.take_along_axis(labels_held, top, axis=-1).sum(-1).mean(-1) / k  # [L]
    moe = moefy_model(model, partition, router, k)
    eval_rows = held.subset(np.arange(min(32, len(held.tokens))))
    agreement = agreement_sweep(model, moe, eval_rows, sweep)
    held_out = {"router_recall_at_k": round(float(recall.mean()), 5),
                "router_recall_per_layer": [round(float(r), 4) for r in recall],
                "top1_agreement_by_k": agreement, "sequences": int(len(eval_rows.tokens))}
    print(f"router recall@{k}: {held_out['router_recall_at_k']:.3f}; teacher-forced top-1 agreement with the dense model "
          f"by k: {agreement}", file=sys.stderr)
    return save_trained(
        options.artifact or os.path.join(out_dir, "moefy.npz"), {"partition": partition, "router": router}, METHOD, model, data,
        out_dir, options, run,
        settings={"num_experts": options.experts, "expert_width": width, "experts_per_token": k, "weighting": "unit"},
        held_out=held_out, record={"router_tokens": int(n), "cluster_tokens": options.cluster_tokens},
    )


register_trainer("moefy", options=MoefyTraining, train=train_moefy)
