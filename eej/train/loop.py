"""One training loop for every add-on: optax AdamW with warmup and clipping, orbax checkpoints, resume.

    params = train(loss_fn, init_params, frozen, lambda step: batch, TrainConfig(...), out_dir)

`loss_fn(trainable, frozen, batch) -> (loss, metrics)` is jitted with `frozen` (the base model and
anything else that does not train) passed as an argument. Checkpoints are written to
`out_dir/checkpoints` every `checkpoint_every_s` seconds and at the end; starting again with the
same `out_dir` resumes from the newest one, losing at most one interval. Because `batch_fn(step)`
is a pure function of the step, a resumed run sees exactly the batches it would have seen.
Metrics go to a progress bar and to `out_dir/train_log.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eej.train.trainers import TrainError, check_options, option

LossFn = Callable[[Any, Any, dict], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation and its checkpoints (fields declared with `option`: every trainer's options).
    seed: the data's shuffle, split and batch order, and the add-on's initial weights."""

    steps: int = option(1000, at_least=1, integer=True)
    batch_size: int = option(8, at_least=1, integer=True)
    learning_rate: float = option(1e-3, flag="lr")
    warmup_steps: int = option(50, flag="warmup")
    stop_at: int | None = option(None, "end at this step, with the learning-rate schedule of --steps (a shortened run; resumable)")
    checkpoint_every_s: float = option(300.0, "seconds between checkpoints", flag="checkpoint-every")
    seed: int = option(0)
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10

    def __post_init__(self) -> None:
        check_options(self, "training")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise TrainError(f"training stop_at must be in [1, steps={self.steps}], got {self.stop_at}")

    def optimizer(self) -> optax.GradientTransformation:
        """AdamW with linear warmup then cosine decay to 10%, after global-norm clipping."""
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, max(1, self.warmup_steps), max(self.steps, self.warmup_steps + 1),
            end_value=self.learning_rate * 0.1,
        )
        return optax.chain(
            optax.clip_by_global_norm(self.grad_clip),
            optax.adamw(schedule, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay),
        )


def _checkpoint_manager(out_dir: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(out_dir), "checkpoints"), options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )


def train(
    loss_fn: LossFn,
    init_params: Any,
    frozen: Any,
    batch_fn: Callable[[int], dict],
    config: TrainConfig,
    out_dir: str,
    description: str = "train",
    progress: bool = True,
    stop_after: int | None = None,
) -> Any:
    """Train `init_params` to `config.steps` steps (resuming from `out_dir` if possible); returns the params.

    stop_after: end (with a checkpoint) after this many steps of this call — to test resumption.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    optimizer = config.optimizer()
    state = {"params": init_params, "opt_state": optimizer.init(init_params), "step": jnp.zeros((), jnp.int32)}
    manager = _checkpoint_manager(out_dir)
    if manager.latest_step() is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    start_step = int(state["step"])

    @jax.jit
    def update(params, opt_state, frozen, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
        return optax.apply_updates(params, updates), opt_state, metrics

    params, opt_state = state["params"], state["opt_state"]
    last_save = time.monotonic()
    end = config.steps if config.stop_at is None else min(config.steps, max(config.stop_at, start_step))
    end = end if stop_after is None else min(end, start_step + stop_after)
    bar = tqdm(total=config.steps, initial=start_step, desc=description, disable=not progress, dynamic_ncols=True)
    log_path = os.path.join(out_dir, "train_log.jsonl")
    running: dict[str, float] = {}
    step = start_step
    with open(log_path, "a") as log:
        for step in range(start_step, end):
            params, opt_state, metrics = update(params, opt_state, frozen, batch_fn(step))
            metrics = {k: float(v) for k, v in metrics.items()}
            running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in metrics.items()}
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in running.items() if k != "grad_norm"})
            if (step + 1) % config.log_every == 0 or step + 1 == end:
                log.write(json.dumps({"step": step + 1, "time": time.time(), **metrics}) + "\n")
                log.flush()
            if time.monotonic() - last_save >= config.checkpoint_every_s:
                _save(manager, step + 1, params, opt_state)
                last_save = time.monotonic()
        step = end
    bar.close()
    if step > start_step:
        _save(manager, step, params, opt_state)
    manager.close()
    return params


def _save(manager, step: int, params: Any, opt_state: Any) -> None:
    import orbax.checkpoint as ocp

    state = {"params": params, "opt_state": opt_state, "step": jnp.asarray(step, jnp.int32)}
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()


def evaluate(loss_fn: LossFn, params: Any, frozen: Any, batch_for: Callable[[np.ndarray, int, np.random.Generator], dict],
             predicting: np.ndarray, rows: np.ndarray, batch_size: int) -> dict[str, float]:
    """Held-out metrics: the loss and `loss_fn`'s metrics averaged over every predicting position of `rows`.

    predicting: [N, T] bool; `batch_for(rows, positions, rng)` makes the batch of sequences `rows` with
    `positions` predicting positions (all of them here, zero-weighted padding beyond).
    """
    step = jax.jit(loss_fn)
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    size = max(1, max(int(predicting[c].sum()) for c in chunks))  # one compiled shape: every position counted
    totals: dict[str, float] = {}
    weight = 0.0
    for chunk in chunks:
        n = int(predicting[chunk].sum())
        loss, metrics = step(params, frozen, batch_for(chunk, size, np.random.default_rng(0)))
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
        weight += n
    return {k: round(v / max(weight, 1.0), 5) for k, v in totals.items()}


def read_log(out_dir: str) -> list[dict]:
    """The metrics lines a training run wrote."""
    path = os.path.join(out_dir, "train_log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` where `mask` is 1 (any shape; mask broadcastable)."""
    mask = jnp.broadcast_to(mask, values.shape).astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
