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

Both distributions can be taken at a decoding temperature τ (`--loss-temperature`, default 1): p_τ ∝ p^(1/τ)
and q_τ = softmax(logits / τ), the two a speculative step samples from at τ. The cached log-normaliser is
τ = 1's, so p_τ's normaliser counts the mass p puts outside V' as one token (for τ < 1 an upper bound
on that part of the sum, so p_τ is at most a little low; for τ > 1 a lower bound). `--objective tvd` minimises 1 - sum_v min(p_τ, q_τ), the
rejection probability itself (total variation, as DistillSpec, Zhou et al. 2023, compares), instead
of the soft cross-entropy.
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

from eej.decoding.speculation import ADAPTER_KEYS, adapter_forward, init_adapter
from eej.model.cache import init_cache
from eej.model.transformer import get_layer, linear, rms_norm
from eej.train.data import DataOptions, batch_indices, predicting_positions, prepare_data
from eej.train.loop import TrainConfig, check_resume, evaluate, run_settings, train
from eej.train.teacher import data_fingerprint, distillation_head, teacher_batch, teacher_cache
from eej.train.trainers import Trained, TrainError, check_options, option, parse_numbers, register_trainer, save_trained
from eej.weights.registry import Model, with_kernels


@dataclasses.dataclass(frozen=True)
class KangarooTraining:
    """`eej train kangaroo`'s options (see the module docstring)."""

    exit_layer: int = option(2, "l: the draft shares the target's layers [0, l)", at_least=0, integer=True)
    draft_vocab: int = option(16384, "V': the draft's vocabulary, the most frequent answer tokens (0 = all)", at_least=0, integer=True)
    positions: int = option(1024, "predicting positions per batch whose distributions are matched", at_least=1, integer=True)
    teacher_cache: str | None = option(None, "directory of cached frozen-model states (default OUT/teacher)",
                                       result=False)
    teacher_depths: str = option("", "further exit layers to cache in the same teacher pass, e.g. 2,4,6", result=False)
    teacher_batch_size: int = option(8, at_least=1, integer=True, result=False)
    eval_fraction: float = option(0.05, "held-out share of the data for the final report")
    init_scale: float = option(0.02, "std of the random adapter projections")
    init_from_layer: bool = option(False, "start the adapter's attention from the target's layer l attention instead of random weights")
    loss_temperature: float = option(1.0, "τ: match the model's and the draft's distributions at this temperature", at_least=0.0)
    objective: str = option("kl", "kl: soft cross-entropy p_τ -> q_τ; tvd: the rejection probability 1 - sum min(p_τ, q_τ)",
                            choices=("kl", "tvd"))
    artifact: str | None = option(None, "artifact path (default OUT/kangaroo.npz)", result=False)
    data_command: str | None = option(None, "the command that made --data (e.g. the self-distillation script), recorded "
                                      "in the artifact's reproduce line", result=False)

    def __post_init__(self) -> None:
        check_options(self, "kangaroo")
        if not 0 <= self.eval_fraction < 1:
            raise TrainError(f"kangaroo eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.loss_temperature <= 0:
            raise TrainError(f"kangaroo loss_temperature must be above 0, got {self.loss_temperature}")


# ----------------------------------------------------------------------------- loss


def tempered(log_p: jax.Array, temperature: float) -> jax.Array:
    """p_τ ∝ p^(1/τ) on the draft vocabulary, [M, V'], from the full distribution's log-probabilities there
    (`log_p`, [M, V']); the mass p puts outside V' counts as one token of p_τ's normaliser."""
    if temperature == 1.0:
        return jnp.exp(log_p)
    outside = jnp.maximum(1.0 - jnp.sum(jnp.exp(log_p), axis=-1, keepdims=True), 1e-30)  # [M, 1]
    scaled = jnp.concatenate([log_p, jnp.log(outside)], axis=-1) / temperature
    return jnp.exp(log_p / temperature - jax.nn.logsumexp(scaled, axis=-1, keepdims=True))


def distill_loss(adapter, frozen, batch, *, cfg, exit_layer: int, temperature: float = 1.0, objective: str = "kl"):
    """The loss of the module docstring, p_τ -> q_τ over the draft vocabulary (batch: `teacher_batch`); metrics:
    expected acceptance at τ, top-1 agreement."""
    h_exit = batch[f"h{exit_layer}"].astype(jnp.float32)
    b, t, _ = h_exit.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    drafted, _ = adapter_forward(adapter, h_exit, init_cache(cfg, b, t, num_layers=1, dtype=jnp.float32), positions, cfg)
    drafted = drafted[batch["b"], batch["t"]]  # [M, D]
    head = frozen["head"]
    q_logits = linear(drafted, head).astype(jnp.float32)
    log_q = jax.nn.log_softmax(q_logits / temperature, axis=-1)
    teacher = rms_norm(batch["h_final"].astype(jnp.float32), frozen["final_norm"], cfg.rms_eps)
    t_logits = linear(teacher, head).astype(jnp.float32)
    p = tempered(t_logits - batch["lse"][:, None], temperature)
    w = batch["weight"]
    total = jnp.maximum(jnp.sum(w), 1.0)
    accepted = jnp.sum(jnp.minimum(p, jnp.exp(log_q)), axis=-1)  # [M]
    accept = jnp.sum(w * accepted) / total
    loss = 1.0 - accept if objective == "tvd" else -jnp.sum(w * jnp.sum(p * log_q, axis=-1)) / total
    top1 = jnp.sum(w * (jnp.argmax(q_logits, -1) == jnp.argmax(t_logits, -1))) / total
    return loss, {"accept": accept, "top1": top1}


# ----------------------------------------------------------------------------- training


def train_kangaroo(model: Model, data: DataOptions, out_dir: str, options: KangarooTraining, run: TrainConfig,
                   progress: bool = True) -> Trained:
    """Train a Kangaroo adapter for `model` on `data`; checkpoints and logs in `out_dir`; writes the artifact."""
    model = with_kernels(model, "xla")  # gradients and teacher states through XLA's kernels, whatever it was loaded with
    cfg = model.cfg
    layers = [options.exit_layer, *parse_numbers(options.teacher_depths, int, "kangaroo teacher_depths")]
    if any(not 0 <= d < cfg.num_layers for d in layers):
        raise TrainError(f"kangaroo exit_layer and teacher_depths must be in [0, {cfg.num_layers - 1}] for {cfg.name}, got {layers}")
    settings = run_settings(model, data, options)
    check_resume(out_dir, run, settings)
    tokenized, train_rows, eval_rows, ranking = prepare_data(model, data, options.eval_fraction, run.seed)
    head, vocab_size = distillation_head(model, ranking, options.draft_vocab)
    teacher = teacher_cache(model, tokenized, layers, options.teacher_cache or os.path.join(out_dir, "teacher"),
                            options.teacher_batch_size, data_fingerprint(model, data, run.seed, len(tokenized)), progress)
    predicting = predicting_positions(tokenized.loss_mask)
    frozen = {"head": head, "final_norm": model.params["final_norm"]}
    init = init_adapter(cfg, run.seed, options.init_scale, norm=np.asarray(model.params["final_norm"]))
    if options.init_from_layer:
        layer = get_layer(model.params["layers"], options.exit_layer)
        init.update({k: np.asarray(layer[k], np.float32) for k in ("attn_norm", "wq", "wk", "wv", "wo")})
    init = jax.tree.map(jnp.asarray, init)

    def batch_for(rows: np.ndarray, positions: int, rng: np.random.Generator) -> dict:
        return teacher_batch(teacher, predicting, rows, [options.exit_layer], cfg.num_layers, positions, rng)

    def batch_fn(step: int) -> dict:
        rows = np.sort(train_rows[batch_indices(len(train_rows), step, run.batch_size, run.seed)])
        return batch_for(rows, options.positions, np.random.default_rng([run.seed, step]))

    loss_fn = functools.partial(distill_loss, cfg=cfg, exit_layer=options.exit_layer,
                                temperature=options.loss_temperature, objective=options.objective)
    adapter = train(loss_fn, init, frozen, batch_fn, run, out_dir, description=f"kangaroo l={options.exit_layer}",
                    progress=progress, settings=settings)
    held_out = evaluate(loss_fn, adapter, frozen, batch_for, predicting, eval_rows, run.batch_size) if len(eval_rows) else {}
    if held_out:
        print(f"held-out: {json.dumps(held_out)}", file=sys.stderr)
    return save_trained(
        options.artifact or os.path.join(out_dir, "kangaroo.npz"),
        {"adapter": {k: adapter[k] for k in ADAPTER_KEYS}, "vocab_rank": ranking}, "kangaroo", model, data, out_dir,
        dataclasses.replace(options, data_command=None), run, command_prefix=options.data_command,
        settings={"exit_layer": options.exit_layer, "draft_vocab": vocab_size},
        held_out=held_out, record={"sequences": int(len(train_rows))},
    )


register_trainer("kangaroo", options=KangarooTraining, train=train_kangaroo)
