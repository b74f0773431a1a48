"""`eej train specee`: train SpecEE's per-layer exit predictors, and choose the offline schedule.

    eej train specee --model smollm2-135m --data ../shared/data/train/*.json* \
        --drafter artifacts/smollm2-135m/kangaroo.npz --out runs/specee --steps 1500

1. Label pass (teacher-forced, frozen model): over chat sequences, for sampled positions that
   predict an assistant token, the drafter's top-k speculative tokens, and at every predictor layer
   i (l .. N-2) the features the decoder would see (`eej.decoding.specee.speculative_features`,
   the change taken against layer i-1: training checks every layer) and the label
   `argmax_i == argmax_final and argmax_i in speculative tokens` (Xu et al. 2025). Cached in OUT.
2. Training (eej.train.loop): binary cross-entropy per layer, positives weighted by that layer's
   negative/positive ratio on the training positions (class balance: deep layers are mostly
   positive, shallow ones rarely), averaged over layers.
3. Held-out report and calibration: per-layer precision/recall at the threshold, and a simulation
   of the decoder's exit rule (first layer whose predictor fires *and* whose argmax is a
   speculative token) checking every layer. The offline schedule is the smallest set of layers that
   holds `--offline-coverage` of the simulated early exits (most-used layers first); it is stored
   in the artifact and used by `offline_layers: trained`.
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

LABELS_FORMAT = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter", required=True, help="the Kangaroo artifact whose draft proposes the speculative tokens")
    p.add_argument("--draft-vocab", type=int, default=None, help="the drafter's V' (default: what the Kangaroo artifact was trained with)")
    p.add_argument("--candidates", type=int, default=4, help="k: speculative tokens per position")
    p.add_argument("--hidden", type=int, default=512, help="the predictors' hidden width")
    p.add_argument("--label-batch-size", type=int, default=8, help="sequences per label-pass batch")
    p.add_argument("--label-positions", type=int, default=512, help="positions sampled per label-pass batch")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of the sequences")
    p.add_argument("--threshold", type=float, default=0.5, help="the threshold the report and calibration use")
    p.add_argument("--sweep-thresholds", default="0.5,0.8,0.9,0.95,0.98,0.99",
                   help="thresholds whose simulated exits (mean layers, agreement) the report lists")
    p.add_argument("--offline-coverage", type=float, default=0.9, help="share of simulated early exits the offline layers must hold")
    p.add_argument("--artifact", default=None, help="artifact path (default OUT/specee.npz)")


# ----------------------------------------------------------------------------- label pass


def _label_fn(params, drafter_params, tokens, rows, cols, *, drafter, k, cfg):
    """Features [M, P, 3k], labels [M, P], in-set flags [M, P] for positions (rows, cols) [M] of tokens [B, T]."""
    from eej.decoding.specee import speculative_features, speculative_logits
    from eej.model.transformer import final_norm, logits_from_hidden
    from eej.train.teacher import hidden_states

    n, l = cfg.num_layers, drafter.tap_layer
    b, t = tokens.shape
    states = hidden_states(params, tokens, cfg, range(l, n + 1))
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    candidates, _ = drafter.propose(params, drafter_params, drafter.init_state(b, t, cfg), states[l], positions, k, cfg)
    candidates = candidates[rows, cols]  # [M, k]
    columns = jnp.moveaxis(jnp.take(params["lm_head"], candidates, axis=1), 0, 1)  # [M, D, k]
    final = jnp.argmax(logits_from_hidden(params, states[n][rows, cols], cfg), axis=-1)
    last = jnp.zeros(candidates.shape, jnp.float32)
    features, labels, in_set = [], [], []
    for i in range(l, n - 1):
        h = states[i + 1][rows, cols]  # the residual leaving layer i
        top = jnp.argmax(logits_from_hidden(params, h, cfg), axis=-1)
        feats, last = speculative_features(speculative_logits(final_norm(params, h, cfg), columns), last)
        hit = jnp.any(top[:, None] == candidates, axis=-1)
        features.append(feats)
        labels.append(hit & (top == final))
        in_set.append(hit)
    return jnp.stack(features, 1), jnp.stack(labels, 1), jnp.stack(in_set, 1)


def label_pass(model, drafter, drafter_params, data, predicting, args, progress=True) -> dict[str, np.ndarray]:
    """Features/labels for sampled assistant positions of every sequence, batch by batch (see the module docstring).

    Returns {"features": [M, P, 3k] float32, "labels": [M, P] bool, "in_set": [M, P] bool, "sequence": [M] int32}.
    """
    from tqdm.auto import tqdm

    fn = jax.jit(functools.partial(_label_fn, drafter=drafter, k=args.candidates, cfg=model.cfg))
    bs = args.label_batch_size
    order = np.argsort(data.lengths, kind="stable")  # similar lengths together: less padding
    out: dict[str, list] = {"features": [], "labels": [], "in_set": [], "sequence": []}
    for start in tqdm(range(0, len(order), bs), desc="specee label pass", disable=not progress):
        seqs = order[start : start + bs]
        width = min(data.tokens.shape[1], -(-int(data.lengths[seqs].max()) // 64) * 64)
        tokens = data.tokens[seqs, :width]
        mask = predicting[seqs, :width]
        if len(seqs) < bs:  # one compiled shape per width
            tokens = np.concatenate([tokens, np.repeat(tokens[-1:], bs - len(seqs), axis=0)])
        rows, cols, real = sample_positions(mask, args.label_positions, np.random.default_rng([args.seed, start]))
        feats, labels, in_set = fn(model.params, drafter_params, jnp.asarray(tokens), jnp.asarray(rows), jnp.asarray(cols))
        out["features"].append(np.asarray(feats)[:real])
        out["labels"].append(np.asarray(labels)[:real])
        out["in_set"].append(np.asarray(in_set)[:real])
        out["sequence"].append(seqs[rows[:real]].astype(np.int32))
    return {k: np.concatenate(v) for k, v in out.items()}


def cached_label_pass(model, drafter, drafter_params, data, predicting, args, fingerprint: dict) -> dict[str, np.ndarray]:
    """`label_pass`, stored in OUT/labels.npz and reused while `fingerprint` matches."""
    path = os.path.join(args.out, "labels.npz")
    want = json.dumps({"format": LABELS_FORMAT, **fingerprint}, sort_keys=True)
    if os.path.exists(path):
        with np.load(path) as f:
            if str(f["meta"]) == want:
                return {k: f[k] for k in ("features", "labels", "in_set", "sequence")}
    labels = label_pass(model, drafter, drafter_params, data, predicting, args, progress=not args.no_progress)
    os.makedirs(args.out, exist_ok=True)
    np.savez(path, meta=np.asarray(want), **labels)
    return labels


# ----------------------------------------------------------------------------- loss and evaluation


def predictor_logits(predictors, features: jax.Array) -> jax.Array:
    """Every layer's predictor on its own features: [M, P, F] -> [M, P] pre-sigmoid outputs."""
    hidden = jax.nn.relu(jnp.einsum("mpf,pfh->mph", features, predictors["w1"]) + predictors["b1"][None])
    return jnp.einsum("mph,ph->mp", hidden, predictors["w2"]) + predictors["b2"][None]


def bce_loss(predictors, frozen, batch):
    """Class-balanced BCE per layer, averaged over layers; metrics: accuracy and mean precision/recall at 0.5."""
    logits = predictor_logits(predictors, batch["features"])
    y = batch["labels"].astype(jnp.float32)
    pos_weight = frozen["pos_weight"][None]  # [1, P]
    per = -(pos_weight * y * jax.nn.log_sigmoid(logits) + (1 - y) * jax.nn.log_sigmoid(-logits))
    norm = pos_weight * y + (1 - y)
    loss = jnp.mean(jnp.sum(per, 0) / jnp.maximum(jnp.sum(norm, 0), 1.0))
    fire = logits > 0
    tp = jnp.sum(fire & (y > 0))
    return loss, {
        "acc": jnp.mean(fire == (y > 0)),
        "precision": tp / jnp.maximum(jnp.sum(fire), 1),
        "recall": tp / jnp.maximum(jnp.sum(y), 1),
    }


def layer_report(fire: np.ndarray, labels: np.ndarray, first_layer: int) -> list[dict]:
    """Per-layer precision, recall and positive rate of firing decisions fire [M, P] against labels [M, P]."""
    out = []
    for p in range(labels.shape[1]):
        f, y = fire[:, p], labels[:, p]
        tp = int(np.sum(f & y))
        out.append({
            "layer": first_layer + p, "positives": round(float(y.mean()), 4),
            "precision": round(tp / max(int(f.sum()), 1), 4), "recall": round(tp / max(int(y.sum()), 1), 4),
        })
    return out


def simulate_exits(fire: np.ndarray, in_set: np.ndarray, labels: np.ndarray, num_layers: int, first_layer: int) -> dict:
    """The decoder's exit rule checking every layer: exit at the first layer that fires and whose argmax is speculative.

    Returns the exit-layer histogram (the last layer = no early exit), mean layers run and the share
    of exits whose token equals the final layer's (1 for positions that reach the last layer).
    """
    leave = fire & in_set
    any_exit = leave.any(axis=1)
    first = np.where(any_exit, leave.argmax(axis=1), -1)
    layer = np.where(any_exit, first + first_layer, num_layers - 1)
    correct = np.where(any_exit, labels[np.arange(len(first)), np.maximum(first, 0)], True)
    return {
        "histogram": np.bincount(layer, minlength=num_layers).tolist(),
        "mean_layers": round(float(np.mean(layer + 1)), 3),
        "early_exit_rate": round(float(any_exit.mean()), 4),
        "agreement": round(float(correct.mean()), 4),
    }


def offline_layers(histogram: list[int], num_layers: int, coverage: float) -> list[int]:
    """The smallest set of layers (most exits first) holding `coverage` of the early exits (last layer excluded)."""
    early = np.asarray(histogram[: num_layers - 1])
    if early.sum() == 0:
        return []
    order = np.argsort(-early, kind="stable")
    cumulative = np.cumsum(early[order]) / early.sum()
    count = int(np.searchsorted(cumulative, coverage - 1e-9) + 1)
    return sorted(int(i) for i in order[:count] if early[i] > 0)


# ----------------------------------------------------------------------------- the command


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CliError(f"--sweep-thresholds must be comma-separated numbers, got {text!r}") from None
    if any(not 0 < t < 1 for t in values):
        raise CliError("--sweep-thresholds must lie in (0, 1)")
    return values


def run(args: argparse.Namespace) -> int:
    from eej.decoding.speculation import load_adapter
    from eej.decoding.specee import KangarooDrafter, drafter_digest, init_predictors
    from eej.weights.artifacts import load_artifact, save_artifact
    from eej.train.data import batch_indices, load_training_data
    from eej.train.kangaroo import predicting_positions
    from eej.train.loop import train
    from eej.cli.train import train_config_from_args
    from eej.settings import resolve_path
    from eej.weights.registry import load_model

    if args.candidates < 1 or args.hidden < 1 or args.label_positions < 1 or args.label_batch_size < 1:
        raise CliError("--candidates, --hidden, --label-positions and --label-batch-size must be >= 1")
    if not 0 < args.eval_fraction < 1 or not 0 < args.offline_coverage <= 1 or not 0 < args.threshold < 1:
        raise CliError("--eval-fraction and --threshold must be in (0, 1), --offline-coverage in (0, 1]")
    config = train_config_from_args(args)
    _thresholds(args.sweep_thresholds)
    model = load_model(args.model)
    cfg = model.cfg
    try:
        _, header = load_artifact(resolve_path(args.drafter), "kangaroo", cfg)
        exit_layer = int(header["settings"]["exit_layer"])
        draft_vocab = int(header["settings"].get("draft_vocab", 0)) if args.draft_vocab is None else args.draft_vocab
        drafter_params = load_adapter(model, args.drafter, exit_layer, draft_vocab)
    except ValueError as e:
        raise CliError(str(e)) from None
    drafter = KangarooDrafter(exit_layer)
    if not 0 <= exit_layer < cfg.num_layers - 1:
        raise CliError(f"the drafter's exit layer {exit_layer} leaves no predictor layer in {cfg.num_layers} layers")
    digest = drafter_digest(drafter_params)

    data = load_training_data(args.data, model.tokenizer, args.seq_len, args.max_examples, args.seed)
    predicting = predicting_positions(data.loss_mask)
    fingerprint = {"model": cfg.name, "data": [os.path.abspath(p) for p in args.data], "seq_len": args.seq_len,
                   "max_examples": args.max_examples, "seed": args.seed, "drafter": digest, "k": args.candidates,
                   "positions": args.label_positions, "batch": args.label_batch_size}
    table = cached_label_pass(model, drafter, drafter_params, data, predicting, args, fingerprint)
    held_out_seq = np.random.default_rng(args.seed + 1).permutation(len(data))[: max(1, int(round(len(data) * args.eval_fraction)))]
    is_eval = np.isin(table["sequence"], held_out_seq)
    train_idx, eval_idx = np.nonzero(~is_eval)[0], np.nonzero(is_eval)[0]
    if len(train_idx) == 0:
        raise CliError("no training positions (more data or a smaller --eval-fraction)")
    labels = table["labels"]
    pos = labels[train_idx].mean(axis=0)
    print(f"label pass: {len(train_idx)} training / {len(eval_idx)} held-out positions; positive rate per layer "
          f"{np.round(pos, 3).tolist()}", file=sys.stderr)
    frozen = {"pos_weight": jnp.asarray(np.clip((1 - pos) / np.maximum(pos, 1e-6), 0.05, 50.0), jnp.float32)}

    def batch_fn(step: int) -> dict:
        index = np.sort(train_idx[batch_indices(len(train_idx), step, config.batch_size, args.seed)])
        return {"features": table["features"][index], "labels": labels[index]}

    first = exit_layer
    init = jax.tree.map(jnp.asarray, init_predictors(cfg.num_layers - 1 - first, args.candidates, args.hidden, args.seed))
    predictors = train(bce_loss, init, frozen, batch_fn, config, args.out, description="specee predictors",
                       progress=not args.no_progress)

    report_idx = eval_idx if len(eval_idx) else train_idx
    logits = np.asarray(jax.jit(predictor_logits)(predictors, jnp.asarray(table["features"][report_idx])))
    fire = logits > np.log(args.threshold / (1 - args.threshold))
    per_layer = layer_report(fire, labels[report_idx], first)
    calibration = simulate_exits(fire, table["in_set"][report_idx], labels[report_idx], cfg.num_layers, first)
    schedule = offline_layers(calibration["histogram"], cfg.num_layers, args.offline_coverage)
    sweep = {}
    for t in _thresholds(args.sweep_thresholds):
        sim = simulate_exits(logits > np.log(t / (1 - t)), table["in_set"][report_idx], labels[report_idx], cfg.num_layers, first)
        sweep[str(t)] = {k: v for k, v in sim.items() if k != "histogram"}
        print(f"threshold {t}: {json.dumps(sweep[str(t)])}", file=sys.stderr)
    print(f"held-out per layer: {json.dumps(per_layer)}", file=sys.stderr)
    print(f"held-out exit simulation (every layer checked, threshold {args.threshold}): {json.dumps(calibration)}", file=sys.stderr)
    print(f"offline layers ({args.offline_coverage:.0%} of early exits): {schedule}", file=sys.stderr)

    artifact = args.artifact or os.path.join(args.out, "specee.npz")
    argv = sys.argv[1:]
    command = "eej train specee " + " ".join(shlex.quote(a) for a in (argv[argv.index("specee") + 1 :] if "specee" in argv else argv))
    save_artifact(
        artifact, {"predictors": {k: np.asarray(v, np.float32) for k, v in predictors.items()}}, "specee", cfg,
        settings={"drafter": {"adapter": args.drafter, "exit_layer": exit_layer, "draft_vocab_size": draft_vocab, "digest": digest},
                  "num_candidates": args.candidates, "offline_layers": schedule, "offline_coverage": args.offline_coverage,
                  "threshold": args.threshold},
        reproduce=command, held_out={"per_layer": per_layer, "exit_simulation": calibration, "threshold_sweep": sweep},
        train={"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
               "positions": int(len(train_idx)), "data": [os.path.basename(p) for p in args.data]},
    )
    print(f"wrote {artifact}", file=sys.stderr)
    return 0


register_trainer("specee", add_arguments, run)
