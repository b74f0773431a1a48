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

import argparse
import os
import sys
import time

import numpy as np

from eej.cli.parser import CliError
from eej.cli.train import register_trainer, train_config_from_args

DEFAULT_SWEEP = "1,2,3,4,6,8,12,16"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=int, default=16, help="experts per layer E (must divide the FFN width)")
    p.add_argument("--top-k", type=int, default=4, help="experts per token k: the labels' k and the shipped default")
    p.add_argument("--router-tokens", type=int, default=16384, help="training tokens for the routers")
    p.add_argument("--cluster-tokens", type=int, default=4096, help="tokens whose activations drive the clustering")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--sweep", default=DEFAULT_SWEEP, help="comma-separated k values for the held-out agreement report")
    p.add_argument("--artifact", default=None, help="where to write the artifact (default OUT/moefy.npz)")


def _token_rows(data, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, position) pairs of `count` real (non-padding) tokens, sampled without replacement."""
    seq = np.concatenate([np.full(n, i) for i, n in enumerate(data.lengths)])
    pos = np.concatenate([np.arange(n) for n in data.lengths])
    pick = rng.choice(len(seq), size=min(count, len(seq)), replace=False)
    return seq[pick], pos[pick]


def collect_mlp_inputs(model, tokens: np.ndarray, seqs: np.ndarray, positions: np.ndarray, batch_size: int, progress: bool) -> np.ndarray:
    """h_l at the chosen (sequence, position) pairs: -> [L, N, D] float32."""
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from eej.experts.moefy import mlp_inputs

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


def agreement_sweep(dense, moe_model, data, ks: list[int]) -> dict[str, float]:
    """Teacher-forced top-1 agreement of the MoE model with the dense model on `data`'s real tokens, per k."""
    import jax.numpy as jnp

    from eej.bench.fidelity import teacher_argmax

    tokens = jnp.asarray(data.tokens)
    mask = np.arange(data.tokens.shape[1])[None, :] < data.lengths[:, None]
    ref = np.concatenate([np.asarray(teacher_argmax(dense.params, tokens[i : i + 8], dense.cfg)) for i in range(0, len(tokens), 8)])
    out = {}
    for k in ks:
        cfg = moe_model.cfg.replace(experts_per_token=k)
        got = np.concatenate([np.asarray(teacher_argmax(moe_model.params, tokens[i : i + 8], cfg)) for i in range(0, len(tokens), 8)])
        out[str(k)] = round(float(np.mean((got == ref)[mask])), 5)
    return out


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from eej.experts.moefy import METHOD, MoefyError, check_split, expert_scores, host_layers, moefy_model, partition_layer, activations
    from eej.weights.artifacts import save_artifact
    from eej.train.data import load_training_data, split
    from eej.train.loop import train
    from eej.weights.registry import load_model

    model = load_model(args.model)
    cfg = model.cfg
    try:
        width = check_split(cfg, args.experts, args.top_k)
    except MoefyError as e:
        raise CliError(str(e)) from e
    sweep = sorted({int(k) for k in args.sweep.split(",") if k.strip()} | {args.top_k})
    if not all(1 <= k <= args.experts for k in sweep):
        raise CliError(f"--sweep values must be in [1, {args.experts}]")
    for path in args.data:
        if not os.path.isfile(path):
            raise CliError(f"training data not found: {path}")
    progress = not args.no_progress
    data = load_training_data(args.data, model.tokenizer, args.seq_len, args.max_examples, args.seed)
    train_data, held = split(data, args.eval_fraction, args.seed)
    rng = np.random.default_rng(args.seed)
    seqs, pos = _token_rows(train_data, args.router_tokens, rng)
    h = collect_mlp_inputs(model, train_data.tokens, seqs, pos, 8, progress)  # [L, N, D]
    hseqs, hpos = _token_rows(held, max(1024, args.router_tokens // 8), rng)
    h_held = collect_mlp_inputs(model, held.tokens, hseqs, hpos, 8, progress)

    dense = host_layers(model)
    started = time.time()
    partition = np.zeros((cfg.num_layers, args.experts, width), np.int32)
    labels = np.zeros((cfg.num_layers, h.shape[1], args.experts), np.float32)
    labels_held = np.zeros((cfg.num_layers, h_held.shape[1], args.experts), np.float32)
    for layer in range(cfg.num_layers):
        wg, wu, wd = (jnp.asarray(dense[n][layer]) for n in ("w_gate", "w_up", "w_down"))
        mags = np.abs(np.asarray(activations(wg, wu, jnp.asarray(h[layer, : args.cluster_tokens]))))
        partition[layer] = partition_layer(mags, args.experts, seed=args.seed + layer)
        for hs, lab in ((h, labels), (h_held, labels_held)):
            scores = np.asarray(expert_scores(wg, wu, wd, jnp.asarray(partition[layer]), jnp.asarray(hs[layer])))
            top = np.argsort(-scores, axis=1)[:, : args.top_k]
            np.put_along_axis(lab[layer], top, 1.0, axis=1)
    print(f"partitioned {cfg.num_layers} layers into {args.experts} experts of {width} neurons in {time.time() - started:.0f} s",
          file=sys.stderr)

    k = args.top_k
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
    batch_size = args.batch_size

    def batch_fn(step: int) -> dict:
        return {"rows": jnp.asarray(np.random.default_rng((args.seed, step)).choice(n, batch_size, replace=False))}

    init = {"router": jnp.asarray(np.random.default_rng(args.seed).standard_normal((cfg.num_layers, cfg.hidden_size, args.experts)).astype(np.float32) * 0.01)}
    params = train(loss_fn, init, frozen, batch_fn, train_config_from_args(args), args.out, description=f"moefy E={args.experts} k={k}",
                   progress=progress)
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
    artifact = args.artifact or os.path.join(args.out, "moefy.npz")
    reproduce = "eej train moefy " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["train", "moefy"] else None
    save_artifact(
        artifact, {"partition": partition, "router": router}, METHOD, cfg,
        settings={"num_experts": args.experts, "expert_width": width, "experts_per_token": k, "weighting": "unit"},
        held_out=held_out, reproduce=reproduce,
        train={"steps": args.steps, "batch_size": batch_size, "lr": args.lr, "router_tokens": int(n),
               "cluster_tokens": args.cluster_tokens, "seq_len": args.seq_len,
               "data": [os.path.basename(p) for p in args.data]},
    )
    print(f"router recall@{k}: {held_out['router_recall_at_k']:.3f}; teacher-forced top-1 agreement with the dense model "
          f"by k: {agreement}", file=sys.stderr)
    print(f"wrote {artifact}", file=sys.stderr)
    return 0


register_trainer("moefy", add_arguments, run)
