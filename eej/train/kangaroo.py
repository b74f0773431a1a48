"""`eej train kangaroo`: train Kangaroo's adapter by distillation from the frozen model.

    eej train kangaroo --model smollm2-135m --data runs/self_distill.jsonl --out runs/kangaroo_l4 \
        --exit-layer 4 --steps 1500

Only the adapter trains. The frozen model runs once over the data (the teacher pass) and its
layer-l and last-layer hidden states are cached on disk (float16, memory-mapped) together with the
log-normaliser of its full-vocabulary next-token distribution; one pass can cache several exit
layers for a sweep (`--teacher-depths`, `--teacher-cache` shared between runs).

Loss (Kangaroo, Liu et al. 2024): soft cross-entropy from the model's next-token distribution p to
the draft's q, on positions that predict an assistant token. The draft head is restricted to the V'
tokens the training answers use most (`--draft-vocab`, the same ranking the reduced draft head
uses at decoding time): q is a softmax over V', p is the model's full distribution evaluated on
those V' tokens (normalised over the full vocabulary with the cached log-normaliser). Then
sum_v min(p_v, q_v) is exactly the probability that a draft sampled from q is accepted, shown in
the progress bar as `accept`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eej.cli.parser import CliError
from eej.cli.train import register_trainer
from eej.train.data import sample_positions

TEACHER_FORMAT = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exit-layer", type=int, default=2, help="l: the draft shares the target's layers [0, l)")
    p.add_argument("--draft-vocab", type=int, default=16384, help="V': the draft's vocabulary, the most frequent answer tokens (0 = all)")
    p.add_argument("--positions", type=int, default=1024, help="predicting positions per batch whose distributions are matched")
    p.add_argument("--teacher-cache", default=None, help="directory of cached frozen-model states (default OUT/teacher)")
    p.add_argument("--teacher-depths", default="", help="further exit layers to cache in the same teacher pass, e.g. 2,4,6")
    p.add_argument("--teacher-batch-size", type=int, default=8)
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of the data for the final report")
    p.add_argument("--init-scale", type=float, default=0.02, help="std of the random adapter projections")
    p.add_argument("--init-from-layer", action="store_true",
                   help="start the adapter's attention from the target's layer l attention instead of random weights")
    p.add_argument("--artifact", default=None, help="artifact path (default OUT/kangaroo.npz)")
    p.add_argument("--data-command", default=None,
                   help="the command that made --data (e.g. the self-distillation script), recorded in the artifact's reproduce line")


# ----------------------------------------------------------------------------- vocabulary


def token_ranking(tokens: np.ndarray, loss_mask: np.ndarray, always: Sequence[int] = ()) -> np.ndarray:
    """Token ids ordered by how often they are training targets (ties: lower id first); `always` first.

    Only tokens that occur are ranked. tokens, loss_mask: [N, T].
    """
    counts = np.bincount(tokens[loss_mask > 0].astype(np.int64), minlength=int(tokens.max()) + 1)
    seen = np.nonzero(counts)[0]
    ranked = seen[np.lexsort((seen, -counts[seen]))]
    first = [int(t) for t in always]
    return np.asarray(first + [int(t) for t in ranked if int(t) not in first], np.int32)


# ----------------------------------------------------------------------------- teacher pass


def _teacher_fn(params, tokens, *, cfg, depths):
    from eej.model.transformer import final_norm, linear
    from eej.train.teacher import hidden_states

    states = hidden_states(params, tokens, cfg, (*depths, cfg.num_layers))
    logits = linear(final_norm(params, states[cfg.num_layers], cfg), params["lm_head"]).astype(jnp.float32)
    return {d: states[d].astype(jnp.float16) for d in states}, jax.nn.logsumexp(logits, axis=-1)


def teacher_cache(model, data, depths: Sequence[int], directory: str, batch_size: int, fingerprint: dict, progress: bool = True) -> dict:
    """Cached frozen-model states for every sequence of `data` (computed if missing or stale).

    Returns {"h{d}": [N, T, D] float16 memmap for each depth d (N = cfg.num_layers included),
    "lse": [N, T] float32 log-normaliser of the full next-token distribution}.
    """
    from tqdm.auto import tqdm

    cfg = model.cfg
    depths = tuple(sorted(set(int(d) for d in depths) | {cfg.num_layers}))
    meta_path = os.path.join(directory, "meta.json")
    want = {"format": TEACHER_FORMAT, **fingerprint}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if {k: meta.get(k) for k in want} == want and set(depths) <= set(meta["depths"]):
            return _open_teacher(directory, meta["depths"])
    os.makedirs(directory, exist_ok=True)
    n, t = data.tokens.shape
    arrays = {f"h{d}": np.lib.format.open_memmap(os.path.join(directory, f"h{d}.npy"), "w+", np.float16, (n, t, cfg.hidden_size)) for d in depths}
    arrays["lse"] = np.lib.format.open_memmap(os.path.join(directory, "lse.npy"), "w+", np.float32, (n, t))
    fn = jax.jit(functools.partial(_teacher_fn, cfg=cfg, depths=depths[:-1]))
    # Sequences sorted by length and cut to a multiple of 64: the pass costs what the real tokens cost.
    order = np.argsort(data.lengths, kind="stable")
    for start in tqdm(range(0, n, batch_size), desc="teacher pass", disable=not progress):
        rows = order[start : start + batch_size]
        width = min(t, -(-int(data.lengths[rows].max()) // 64) * 64)
        tokens = data.tokens[rows, :width]
        if len(rows) < batch_size:
            tokens = np.concatenate([tokens, np.repeat(tokens[-1:], batch_size - len(rows), axis=0)])
        states, lse = fn(model.params, jnp.asarray(tokens))
        for d in depths:
            arrays[f"h{d}"][rows, :width] = np.asarray(states[d][: len(rows)])
        arrays["lse"][rows, :width] = np.asarray(lse[: len(rows)])
    for a in arrays.values():
        a.flush()
    with open(meta_path, "w") as f:
        json.dump({**want, "depths": list(depths)}, f)
    return _open_teacher(directory, depths)


def _open_teacher(directory: str, depths) -> dict:
    out = {f"h{d}": np.load(os.path.join(directory, f"h{d}.npy"), mmap_mode="r") for d in depths}
    out["lse"] = np.load(os.path.join(directory, "lse.npy"), mmap_mode="r")
    return out


# ----------------------------------------------------------------------------- batches and loss


def predicting_positions(loss_mask: np.ndarray) -> np.ndarray:
    """[N, T] bool: position t predicts an assistant token (the target at t + 1 is in the loss)."""
    out = np.zeros(loss_mask.shape, bool)
    out[:, :-1] = loss_mask[:, 1:] > 0
    return out


def make_batch(teacher: dict, predicting: np.ndarray, rows: np.ndarray, exit_layer: int, final_layer: int,
               num_positions: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A training batch for sequences `rows`: exit-layer states of whole sequences, and `num_positions`
    predicting positions (sampled if there are more, zero-weighted padding if fewer) with their teacher data."""
    rows = np.asarray(rows)
    b_idx, t_idx, real = sample_positions(predicting[rows], num_positions, rng)
    weight = (np.arange(num_positions) < real).astype(np.float32)
    h_exit = np.asarray(teacher[f"h{exit_layer}"][rows])
    h_final = np.asarray(teacher[f"h{final_layer}"][rows])[b_idx, t_idx]
    lse = np.asarray(teacher["lse"][rows])[b_idx, t_idx]
    return {"h_exit": h_exit, "b": b_idx, "t": t_idx, "weight": weight, "h_final": h_final, "lse": lse}


def distill_loss(adapter, frozen, batch, *, cfg):
    """Soft cross-entropy p -> q over the draft vocabulary; metrics: expected acceptance, top-1 agreement."""
    from eej.decoding.speculation import adapter_forward
    from eej.model.cache import init_cache
    from eej.model.transformer import linear, rms_norm

    h_exit = batch["h_exit"].astype(jnp.float32)
    b, t, _ = h_exit.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    drafted, _ = adapter_forward(adapter, h_exit, init_cache(cfg, b, t, num_layers=1, dtype=jnp.float32), positions, cfg)
    drafted = drafted[batch["b"], batch["t"]]  # [M, D]
    head = frozen["head"]
    log_q = jax.nn.log_softmax(linear(drafted, head).astype(jnp.float32), axis=-1)
    teacher = rms_norm(batch["h_final"].astype(jnp.float32), frozen["final_norm"], cfg.rms_eps)
    t_logits = linear(teacher, head).astype(jnp.float32)
    p = jnp.exp(t_logits - batch["lse"][:, None])
    w = batch["weight"]
    total = jnp.maximum(jnp.sum(w), 1.0)
    loss = -jnp.sum(w * jnp.sum(p * log_q, axis=-1)) / total
    accept = jnp.sum(w * jnp.sum(jnp.minimum(p, jnp.exp(log_q)), axis=-1)) / total
    top1 = jnp.sum(w * (jnp.argmax(log_q, -1) == jnp.argmax(t_logits, -1))) / total
    return loss, {"accept": accept, "top1": top1}


# ----------------------------------------------------------------------------- the command


def prepare_data(model, args: argparse.Namespace):
    """Training sequences and their split -> (data, train_rows, eval_rows, token ranking of the train answers).

    Reads args.data, seq_len, max_examples, seed, eval_fraction; deterministic, so an evaluation
    script given the same options sees the same held-out rows.
    """
    from eej.train.data import load_training_data

    data = load_training_data(args.data, model.tokenizer, args.seq_len, args.max_examples, args.seed)
    order = np.random.default_rng(args.seed + 1).permutation(len(data))
    n_eval = int(round(len(data) * args.eval_fraction))
    eval_rows, train_rows = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    ranking = token_ranking(data.tokens[train_rows], data.loss_mask[train_rows], always=model.cfg.eos_ids)
    return data, train_rows, eval_rows, ranking


def data_fingerprint(model, data, args: argparse.Namespace) -> dict:
    """What a teacher cache depends on."""
    return {
        "model": model.cfg.name, "data": [os.path.abspath(p) for p in args.data], "seq_len": args.seq_len,
        "max_examples": args.max_examples, "seed": args.seed, "sequences": len(data),
    }


def run(args: argparse.Namespace) -> int:
    from eej.decoding.speculation import ADAPTER_KEYS, init_adapter
    from eej.weights.artifacts import save_artifact
    from eej.train.data import batch_indices
    from eej.train.loop import train
    from eej.cli.train import train_config_from_args
    from eej.weights.registry import load_model

    model = load_model(args.model)
    cfg = model.cfg
    if not 0 <= args.exit_layer < cfg.num_layers:
        raise CliError(f"--exit-layer must be in [0, {cfg.num_layers - 1}] for {cfg.name}, got {args.exit_layer}")
    try:
        extra = [int(d) for d in args.teacher_depths.split(",") if d.strip()]
    except ValueError:
        raise CliError(f"--teacher-depths must be comma-separated integers, got {args.teacher_depths!r}") from None
    if any(not 0 <= d < cfg.num_layers for d in extra):
        raise CliError(f"--teacher-depths must be in [0, {cfg.num_layers - 1}]")
    if args.positions < 1 or args.draft_vocab < 0 or not 0 <= args.eval_fraction < 1:
        raise CliError("--positions must be >= 1, --draft-vocab >= 0 and --eval-fraction in [0, 1)")
    config = train_config_from_args(args)

    data, train_rows, eval_rows, ranking = prepare_data(model, args)
    n_eval = len(eval_rows)
    vocab = ranking[: args.draft_vocab] if args.draft_vocab else None
    if vocab is not None and len(vocab) < args.draft_vocab:
        print(f"note: the answers use only {len(vocab)} distinct tokens; --draft-vocab {args.draft_vocab} -> {len(vocab)}", file=sys.stderr)
    teacher = teacher_cache(
        model, data, [args.exit_layer, *extra], args.teacher_cache or os.path.join(args.out, "teacher"),
        args.teacher_batch_size, data_fingerprint(model, data, args), progress=not args.no_progress,
    )
    predicting = predicting_positions(data.loss_mask)
    head = model.params["lm_head"] if vocab is None else jnp.take(model.params["lm_head"], jnp.asarray(vocab), axis=1)
    frozen = {"head": head, "final_norm": model.params["final_norm"]}
    init = init_adapter(cfg, args.seed, args.init_scale, norm=np.asarray(model.params["final_norm"]))
    if args.init_from_layer:
        from eej.model.transformer import get_layer

        layer = get_layer(model.params["layers"], args.exit_layer)
        init.update({k: np.asarray(layer[k], np.float32) for k in ("attn_norm", "wq", "wk", "wv", "wo")})
    init = jax.tree.map(jnp.asarray, init)

    def batch_fn(step: int) -> dict:
        rows = np.sort(train_rows[batch_indices(len(train_rows), step, config.batch_size, args.seed)])
        return make_batch(teacher, predicting, rows, args.exit_layer, cfg.num_layers, args.positions,
                          np.random.default_rng([args.seed, step]))

    loss_fn = functools.partial(distill_loss, cfg=cfg)
    adapter = train(loss_fn, init, frozen, batch_fn, config, args.out, description=f"kangaroo l={args.exit_layer}",
                    progress=not args.no_progress)
    held_out = evaluate(loss_fn, adapter, frozen, teacher, predicting, eval_rows, args, cfg) if n_eval else {}
    if held_out:
        print(f"held-out: {json.dumps(held_out)}", file=sys.stderr)

    artifact = args.artifact or os.path.join(args.out, "kangaroo.npz")
    command = "eej train kangaroo " + " ".join(shlex.quote(a) for a in _train_argv(args))
    if args.data_command:
        command = f"{args.data_command} && {command}"
    save_artifact(
        artifact, {"adapter": {k: adapter[k] for k in ADAPTER_KEYS}, "vocab_rank": ranking}, "kangaroo", cfg,
        settings={"exit_layer": args.exit_layer, "draft_vocab": int(len(vocab)) if vocab is not None else 0},
        reproduce=command, held_out=held_out,
        train={"steps": args.steps, "stop_at": args.stop_at, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
               "sequences": int(len(train_rows)), "data": [os.path.basename(p) for p in args.data]},
    )
    print(f"wrote {artifact}", file=sys.stderr)
    return 0


def evaluate(loss_fn, adapter, frozen, teacher, predicting, rows, args, cfg) -> dict[str, float]:
    """Mean loss / expected acceptance / top-1 agreement over every predicting position of `rows`."""
    step = jax.jit(loss_fn)
    totals: dict[str, float] = {}
    weight = 0.0
    chunks = [rows[i : i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    size = max(int(predicting[c].sum()) for c in chunks)  # one compiled shape: every position counted
    for chunk in chunks:
        positions = int(predicting[chunk].sum())
        batch = make_batch(teacher, predicting, chunk, args.exit_layer, cfg.num_layers, max(size, 1), np.random.default_rng(0))
        loss, metrics = step(adapter, frozen, batch)
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v) * positions
        weight += positions
    return {k: round(v / max(weight, 1.0), 5) for k, v in totals.items()}


def _train_argv(args: argparse.Namespace) -> list[str]:
    """This command's options as typed, less --data-command (which the reproduce line puts in front)."""
    argv = getattr(args, "argv", None) or sys.argv[1:]
    argv = argv[argv.index("kangaroo") + 1 :] if "kangaroo" in argv else argv
    out, skip = [], False
    for a in argv:
        if skip or a.startswith("--data-command="):
            skip = False
            continue
        skip = a == "--data-command"
        if not skip:
            out.append(a)
    return out


register_trainer("kangaroo", add_arguments, run)
