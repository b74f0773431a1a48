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

import dataclasses
import functools
import json
import os
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from eej.decoding.specee import KangarooDrafter, drafter_digest, init_predictors, speculative_features, speculative_logits
from eej.decoding.speculation import load_adapter
from eej.model.transformer import final_norm, logits_from_hidden
from eej.settings import resolve_path
from eej.train.data import (DataOptions, TokenizedData, batch_indices, length_batches, load_training_data, predicting_positions,
                            sample_positions, split_rows)
from eej.train.loop import TrainConfig, check_resume, run_settings, train
from eej.train.teacher import data_fingerprint, hidden_states
from eej.train.trainers import Trained, TrainError, check_options, option, parse_numbers, register_trainer, save_trained
from eej.weights.artifacts import load_artifact
from eej.weights.registry import Model, with_kernels

LABELS_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class SpecEETraining:
    """`eej train specee`'s options (see the module docstring)."""

    drafter: str = option(help="the Kangaroo artifact whose draft proposes the speculative tokens")
    draft_vocab: int | None = option(None, "the drafter's V' (default: what the Kangaroo artifact was trained with)")
    candidates: int = option(4, "k: speculative tokens per position", at_least=1, integer=True)
    hidden: int = option(512, "the predictors' hidden width", at_least=1, integer=True)
    label_batch_size: int = option(8, "sequences per label-pass batch", at_least=1, integer=True)
    label_positions: int = option(512, "positions sampled per label-pass batch", at_least=1, integer=True)
    eval_fraction: float = option(0.1, "held-out share of the sequences")
    threshold: float = option(0.5, "the threshold the report and calibration use", result=False)
    sweep_thresholds: str = option("0.5,0.8,0.9,0.95,0.98,0.99",
                                   "thresholds whose simulated exits (mean layers, agreement) the report lists",
                                   result=False)
    offline_coverage: float = option(0.9, "share of simulated early exits the offline layers must hold", result=False)
    artifact: str | None = option(None, "artifact path (default OUT/specee.npz)", result=False)

    def __post_init__(self) -> None:
        check_options(self, "specee")
        if not 0 < self.eval_fraction < 1 or not 0 < self.offline_coverage <= 1 or not 0 < self.threshold < 1:
            raise TrainError("specee eval_fraction and threshold must be in (0, 1), offline_coverage in (0, 1]")
        if any(not 0 < t < 1 for t in parse_numbers(self.sweep_thresholds, float, "specee sweep_thresholds")):
            raise TrainError("specee sweep_thresholds must lie in (0, 1)")


# ----------------------------------------------------------------------------- label pass


def _label_fn(params, drafter_params, tokens, rows, cols, *, drafter, k, cfg):
    """Features [M, P, 3k], labels [M, P], in-set flags [M, P] for positions (rows, cols) [M] of tokens [B, T]."""
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


def label_pass(model: Model, drafter: KangarooDrafter, drafter_params: dict, data: TokenizedData, predicting: np.ndarray,
               options: SpecEETraining, seed: int, path: str, fingerprint: dict, progress: bool = True) -> dict[str, np.ndarray]:
    """Features/labels for sampled assistant positions of every sequence, batch by batch (see the module docstring);
    stored in `path` and reused while `fingerprint` matches.

    Returns {"features": [M, P, 3k] float32, "labels": [M, P] bool, "in_set": [M, P] bool, "sequence": [M] int32}.
    """
    want = json.dumps({"format": LABELS_FORMAT, **fingerprint}, sort_keys=True)
    if os.path.exists(path):
        try:
            with np.load(path) as f:
                if str(f["meta"]) == want:
                    return {k: f[k] for k in ("features", "labels", "in_set", "sequence")}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # damaged: labelled again below
            pass
    fn = jax.jit(functools.partial(_label_fn, drafter=drafter, k=options.candidates, cfg=model.cfg))
    out: dict[str, list] = {"features": [], "labels": [], "in_set": [], "sequence": []}
    for start, seqs, tokens in length_batches(data, options.label_batch_size, "specee label pass", progress):
        mask = predicting[seqs, : tokens.shape[1]]
        rows, cols, real = sample_positions(mask, options.label_positions, np.random.default_rng([seed, start]))
        feats, labels, in_set = fn(model.params, drafter_params, jnp.asarray(tokens), jnp.asarray(rows), jnp.asarray(cols))
        out["features"].append(np.asarray(feats)[:real])
        out["labels"].append(np.asarray(labels)[:real])
        out["in_set"].append(np.asarray(in_set)[:real])
        out["sequence"].append(seqs[rows[:real]].astype(np.int32))
    table = {k: np.concatenate(v) for k, v in out.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "wb") as f:  # then renamed: an interrupted write never looks complete
        np.savez(f, meta=np.asarray(want), **table)
    os.replace(path + ".tmp", path)
    return table


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


# ----------------------------------------------------------------------------- training


def train_specee(model: Model, data: DataOptions, out_dir: str, options: SpecEETraining, run: TrainConfig,
                 progress: bool = True) -> Trained:
    """Label, train and calibrate SpecEE's predictors for `model` with `options.drafter`; writes the artifact."""
    model = with_kernels(model, "xla")  # gradients and teacher states through XLA's kernels, whatever it was loaded with
    cfg = model.cfg
    _, header = load_artifact(resolve_path(options.drafter), "kangaroo", cfg)
    exit_layer = int(header["settings"]["exit_layer"])
    draft_vocab = int(header["settings"].get("draft_vocab", 0)) if options.draft_vocab is None else options.draft_vocab
    drafter_params = load_adapter(model, options.drafter, exit_layer, draft_vocab)
    drafter = KangarooDrafter(exit_layer)
    if not 0 <= exit_layer < cfg.num_layers - 1:
        raise TrainError(f"the drafter's exit layer {exit_layer} leaves no predictor layer in {cfg.num_layers} layers")
    digest = drafter_digest(drafter_params)
    settings = run_settings(model, data, options, drafter=digest, draft_vocab=draft_vocab)  # the drafter's content
    check_resume(out_dir, run, settings)

    tokenized = load_training_data(data.files, model.tokenizer, data.seq_len, data.max_examples, run.seed)
    predicting = predicting_positions(tokenized.loss_mask)
    fingerprint = {**data_fingerprint(model, data, run.seed, len(tokenized)), "drafter": digest, "k": options.candidates,
                   "positions": options.label_positions, "batch": options.label_batch_size}
    table = label_pass(model, drafter, drafter_params, tokenized, predicting, options, run.seed,
                       os.path.join(out_dir, "labels.npz"), fingerprint, progress)
    is_eval = np.isin(table["sequence"], split_rows(len(tokenized), options.eval_fraction, run.seed)[1])
    train_idx, eval_idx = np.nonzero(~is_eval)[0], np.nonzero(is_eval)[0]
    if len(train_idx) == 0:
        raise TrainError("no training positions (more data or a smaller eval_fraction)")
    labels = table["labels"]
    pos = labels[train_idx].mean(axis=0)
    print(f"label pass: {len(train_idx)} training / {len(eval_idx)} held-out positions; positive rate per layer "
          f"{np.round(pos, 3).tolist()}", file=sys.stderr)
    frozen = {"pos_weight": jnp.asarray(np.clip((1 - pos) / np.maximum(pos, 1e-6), 0.05, 50.0), jnp.float32)}

    def batch_fn(step: int) -> dict:
        index = np.sort(train_idx[batch_indices(len(train_idx), step, run.batch_size, run.seed)])
        return {"features": table["features"][index], "labels": labels[index]}

    first = exit_layer
    init = jax.tree.map(jnp.asarray, init_predictors(cfg.num_layers - 1 - first, options.candidates, options.hidden, run.seed))
    predictors = train(bce_loss, init, frozen, batch_fn, run, out_dir, description="specee predictors",
                       progress=progress, settings=settings)

    report_idx = eval_idx if len(eval_idx) else train_idx
    logits = np.asarray(jax.jit(predictor_logits)(predictors, jnp.asarray(table["features"][report_idx])))
    fire = logits > np.log(options.threshold / (1 - options.threshold))
    per_layer = layer_report(fire, labels[report_idx], first)
    calibration = simulate_exits(fire, table["in_set"][report_idx], labels[report_idx], cfg.num_layers, first)
    schedule = offline_layers(calibration["histogram"], cfg.num_layers, options.offline_coverage)
    sweep = {}
    for t in parse_numbers(options.sweep_thresholds, float, "specee sweep_thresholds"):
        sim = simulate_exits(logits > np.log(t / (1 - t)), table["in_set"][report_idx], labels[report_idx], cfg.num_layers, first)
        sweep[str(t)] = {k: v for k, v in sim.items() if k != "histogram"}
        print(f"threshold {t}: {json.dumps(sweep[str(t)])}", file=sys.stderr)
    print(f"held-out per layer: {json.dumps(per_layer)}", file=sys.stderr)
    print(f"held-out exit simulation (every layer checked, threshold {options.threshold}): {json.dumps(calibration)}", file=sys.stderr)
    print(f"offline layers ({options.offline_coverage:.0%} of early exits): {schedule}", file=sys.stderr)

    return save_trained(
        options.artifact or os.path.join(out_dir, "specee.npz"),
        {"predictors": {k: np.asarray(v, np.float32) for k, v in predictors.items()}}, "specee", model, data, out_dir, options, run,
        settings={"drafter": {"adapter": options.drafter, "exit_layer": exit_layer, "draft_vocab_size": draft_vocab, "digest": digest},
                  "num_candidates": options.candidates, "offline_layers": schedule, "offline_coverage": options.offline_coverage,
                  "threshold": options.threshold},
        held_out={"per_layer": per_layer, "exit_simulation": calibration, "threshold_sweep": sweep},
        record={"positions": int(len(train_idx))},
    )


register_trainer("specee", options=SpecEETraining, train=train_specee)
