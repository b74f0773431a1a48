"""One training loop for every add-on: optax AdamW with warmup and clipping, orbax checkpoints, resume.

    params = train(loss_fn, init_params, frozen, lambda step: batch, TrainConfig(...), out_dir)

`loss_fn(trainable, frozen, batch) -> (loss, metrics)` is jitted with `frozen` (the base model and
anything else that does not train) passed as an argument. Checkpoints are written to
`out_dir/checkpoints` every `checkpoint_every_s` seconds and at the end; starting again with the
same `out_dir` resumes from the newest one that restores intact (an older one if the newest is
damaged), losing at most one interval. Because `batch_fn(step)` is a pure function of the step, a
resumed run sees exactly the batches it would have seen. Metrics go to a progress bar and to
`out_dir/train_log.jsonl`.

Reliability: `out_dir/run.json` records what the run's result depends on (`run_settings` and the
TrainConfig) and a checksum of each checkpoint; resuming with other settings is a TrainError naming
them unless `restart` discards the old run. Only `steps` (which may grow: the remaining steps follow
the schedule of the new budget), `stop_at`, the checkpoint cadence and the options a trainer declares
with `result=False` (paths) may change on resume. A loss or gradient that is not finite stops the run
with a TrainError naming the step, before anything is saved. `out_dir/train.lock` (flock) keeps a
second run out of the directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import zlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eej.files import LockHeld, locked
from eej.train.data import DataOptions, file_digests
from eej.train.trainers import TrainError, check_options, option, result_settings
from eej.weights.convert import check_finite
from eej.weights.registry import Model

LossFn = Callable[[Any, Any, dict], tuple[jax.Array, dict[str, jax.Array]]]

RUN_FILE, LOCK_FILE, LOG_FILE = "run.json", "train.lock", "train_log.jsonl"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation and its checkpoints (fields declared with `option`: every trainer's options).
    seed: the data's shuffle, split and batch order, and the add-on's initial weights."""

    steps: int = option(1000, at_least=1, integer=True)
    batch_size: int = option(8, at_least=1, integer=True)
    learning_rate: float = option(1e-3, flag="lr")
    warmup_steps: int = option(50, flag="warmup", at_least=0, integer=True)
    stop_at: int | None = option(
        None, "end at this step, with the learning-rate schedule of --steps (a shortened run; resumable)", result=False)
    checkpoint_every_s: float = option(
        300.0, "seconds between checkpoints", flag="checkpoint-every", result=False, at_least=0)
    seed: int = option(0, at_least=0, integer=True)
    restart: bool = option(
        False, "discard the run already in --out (its checkpoints, log and settings) and start again", result=False)
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10

    def __post_init__(self) -> None:
        check_options(self, "training")
        if not self.learning_rate > 0:
            raise TrainError(f"training learning_rate must be > 0, got {self.learning_rate}")
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

    return ocp.CheckpointManager(_checkpoint_dir(out_dir), options=ocp.CheckpointManagerOptions(max_to_keep=2))


def _checkpoint_dir(out_dir: str) -> str:
    return os.path.join(os.path.abspath(out_dir), "checkpoints")


def run_settings(model: Model, data: DataOptions, options: Any, **extra: Any) -> dict[str, Any]:
    """What a run's result depends on besides its TrainConfig (`train`'s `settings`): the model, the training
    data's options and content (the files' digests, not their paths), the method's options that change the
    result (`result_settings`) and `extra` (e.g. the schedule a preset name stands for)."""
    return {"model": model.cfg.name, **result_settings(data), "files": file_digests(data.files),
            **result_settings(options), **extra}


_HELD_LOCKS: dict[str, int] = {}


@contextlib.contextmanager
def run_lock(out_dir: str) -> Iterator[None]:
    """Hold `out_dir`'s training lock (OUT/train.lock, flock) for the block; re-entrant within a process.
    Another process holding it is a TrainError naming the lock file and the holder's pid."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(out_dir, LOCK_FILE))
    if path in _HELD_LOCKS:
        _HELD_LOCKS[path] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[path] -= 1
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(path))
        except LockHeld as e:
            raise TrainError(f"{out_dir} is in use by another training run (lock {path} held by process {e.holder}); "
                             "wait for it to end or use another --out") from None
        _HELD_LOCKS[path] = 1
        try:
            yield
        finally:
            del _HELD_LOCKS[path]


def _read_run(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, RUN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        intact = isinstance(record, dict) and isinstance(record.get("settings"), dict)
        intact = intact and isinstance(record.get("steps"), int)
    except (ValueError, UnicodeDecodeError):
        intact = False
    if not intact:
        raise TrainError(f"{path} is damaged: pass --restart to discard the run in {out_dir}, or use another --out")
    return record


def _write_run(out_dir: str, record: dict) -> None:
    path = os.path.join(out_dir, RUN_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _run_record(config: TrainConfig, settings: dict[str, Any]) -> dict[str, Any]:
    # steps may grow on resume, the rest of the config must match; log_every only changes the log
    record = {k: v for k, v in result_settings(config).items() if k not in ("steps", "log_every")}
    return json.loads(json.dumps({**record, **settings}))


def check_resume(out_dir: str, config: TrainConfig, settings: dict[str, Any]) -> None:
    """TrainError if `out_dir` holds checkpoints of a run that `config` and `settings` may not resume (module
    docstring). `train` checks this itself; trainers call it first too, before a long teacher pass."""
    checkpoints = _checkpoint_dir(out_dir)
    if config.restart or not os.path.isdir(checkpoints) or not any(n.isdigit() for n in os.listdir(checkpoints)):
        return
    before = _read_run(out_dir)
    if before is not None:
        _check_resume(out_dir, before, _run_record(config, settings), config.steps)


def _check_resume(out_dir: str, before: dict, settings: dict, steps: int) -> None:
    """TrainError naming what differs between the run in `out_dir` (`before`, its run.json) and this one."""
    differ = [f"{k} {_short(before['settings'].get(k))} -> {_short(v)}" for k, v in settings.items()
              if before["settings"].get(k) != v]
    differ += [f"{k} {_short(v)} -> (none)" for k, v in before["settings"].items() if k not in settings]
    if differ:
        raise TrainError(f"{out_dir} holds a run with other settings ({'; '.join(differ)}): pass --restart to discard "
                         "it, or use another --out")
    if steps < before["steps"]:
        raise TrainError(f"{out_dir} holds a run of {before['steps']} steps; resuming, --steps may only grow (use "
                         "--stop-at to end earlier), or pass --restart to discard the run")


def _checksum(state: Any) -> str:
    """crc32 of every leaf's bytes, in tree order: a checkpoint whose bytes changed on disk restores to another sum."""
    crc = 0
    for leaf in jax.tree.leaves(state):
        crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), crc)
    return f"{crc:08x}"


def _restore(manager, state: Any, sums: dict[str, str]) -> Any:
    """The newest checkpoint that restores intact (readable, finite, its checksum as recorded), `state` if there is
    none yet. Each damaged one is deleted (its step is saved again when training passes it) with one warning line;
    if none restores, a TrainError."""
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    steps = sorted(manager.all_steps(), reverse=True)
    for n, step in enumerate(steps):
        where = os.path.join(str(manager.directory), str(step))
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise many kinds of error for a damaged file
            reason = " ".join(str(e).split())[:160] or type(e).__name__
        else:
            # The checksum first: a mismatch says the bytes changed since the save, the more precise diagnosis when
            # the changed bytes also decode as nan or inf.
            recorded = sums.get(str(step))  # none: saved by an older eej, or interrupted before it was written
            if recorded not in (None, _checksum(restored)):
                reason = "checksum mismatch"
            else:
                try:
                    check_finite(restored, where)
                    reason = None
                except ValueError:
                    reason = "nan or inf in its weights"
        if reason is None:
            for damaged in steps[:n]:
                manager.delete(damaged)
            return restored
        if n + 1 == len(steps):
            raise TrainError(f"no checkpoint in {manager.directory} restores (the oldest, {where}: {reason}); pass "
                             "--restart to discard the run and start again")
        print(f"eej: warning: checkpoint {where} is damaged ({reason}); trying step {steps[n + 1]}", file=sys.stderr)
    return state


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
    settings: dict[str, Any] | None = None,
) -> Any:
    """Train `init_params` to `config.steps` steps (resuming from `out_dir` if possible); returns the params.

    settings: what the result depends on besides `config` (`run_settings`), checked on resume (module docstring).
    stop_after: end (with a checkpoint) after this many steps of this call — to test resumption.
    """
    with run_lock(out_dir):
        return _train(loss_fn, init_params, frozen, batch_fn, config, out_dir, description, progress, stop_after,
                      settings or {})


def _train(loss_fn, init_params, frozen, batch_fn, config, out_dir, description, progress, stop_after, settings):
    from tqdm.auto import tqdm

    record = _run_record(config, settings)
    if config.restart:
        shutil.rmtree(_checkpoint_dir(out_dir), ignore_errors=True)
        for name in (RUN_FILE, LOG_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))
    optimizer = config.optimizer()
    state = {"params": init_params, "opt_state": optimizer.init(init_params), "step": jnp.zeros((), jnp.int32)}
    with contextlib.closing(_checkpoint_manager(out_dir)) as manager:  # closed on errors too (orbax's threads)
        before = _read_run(out_dir)
        run = {"settings": record, "steps": config.steps, "checksums": {}}
        if manager.all_steps():
            if before is None:
                print(f"eej: warning: {out_dir} has checkpoints but no {RUN_FILE} (an older eej): resuming without "
                      "checking its settings", file=sys.stderr)
            else:
                _check_resume(out_dir, before, record, config.steps)
                run["checksums"] = dict(before.get("checksums", {}))
            state = _restore(manager, state, run["checksums"])
        _write_run(out_dir, run)
        start_step = int(state["step"])

        @jax.jit
        def update(params, opt_state, frozen, batch):
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
            return optax.apply_updates(params, updates), opt_state, metrics

        def save(step: int) -> None:
            run["checksums"] = _save(manager, step, params, opt_state, run["checksums"])
            _write_run(out_dir, run)

        params, opt_state = state["params"], state["opt_state"]
        last_save, saved = time.monotonic(), start_step
        end = config.steps if config.stop_at is None else min(config.steps, max(config.stop_at, start_step))
        end = end if stop_after is None else min(end, start_step + stop_after)
        bar = tqdm(total=config.steps, initial=start_step, desc=description, disable=not progress,
                   dynamic_ncols=True)
        running: dict[str, float] = {}
        step = start_step
        try:
            with open(os.path.join(out_dir, LOG_FILE), "a") as log:
                for step in range(start_step, end):
                    params, opt_state, metrics = update(params, opt_state, frozen, batch_fn(step))
                    metrics = {k: float(v) for k, v in metrics.items()}
                    if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                        loss, norm = metrics["loss"], metrics["grad_norm"]
                        raise TrainError(f"training diverged at step {step + 1}: loss {loss:.4g}, gradient norm "
                                         f"{norm:.4g} (not finite); nothing saved past step {saved} — lower --lr, or "
                                         f"check the data and the checkpoints in {out_dir}")
                    running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in metrics.items()}
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in running.items() if k != "grad_norm"})
                    if (step + 1) % config.log_every == 0 or step + 1 == end:
                        log.write(json.dumps({"step": step + 1, "time": time.time(), **metrics}) + "\n")
                        log.flush()
                    if time.monotonic() - last_save >= config.checkpoint_every_s:
                        save(step + 1)
                        last_save, saved = time.monotonic(), step + 1
                step = end
            if step > saved:  # not already saved by the timed save of the last step
                save(step)
        finally:
            bar.close()
        return params


def _save(manager, step: int, params: Any, opt_state: Any, checksums: dict[str, str]) -> dict[str, str]:
    """Write the checkpoint of `step`; returns `checksums` with its checksum, for the checkpoints kept."""
    import orbax.checkpoint as ocp

    state = {"params": params, "opt_state": opt_state, "step": jnp.asarray(step, jnp.int32)}
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    kept = {str(s) for s in manager.all_steps()}
    return {**{k: v for k, v in checksums.items() if k in kept}, str(step): _checksum(state)}


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
    path = os.path.join(out_dir, LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` where `mask` is 1 (any shape; mask broadcastable)."""
    mask = jnp.broadcast_to(mask, values.shape).astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
