"""How often SpecEE takes its checking path, and what those steps realized, on 8 prompts from the training sets
(three gsm8k questions, three role-play instructions, two code tasks; 128 new tokens) at batch 4 and 1.

    PYTHONSAFEPATH=1 .venv/bin/python scripts/specee_checking_steps.py            (the current rule)
    NOGATE=1 PYTHONSAFEPATH=1 .venv/bin/python scripts/specee_checking_steps.py   (the batch gate off: its
        check_gain then sums every checking step's realized gain, printed per prompt and in all)
    BATCHES=4 ...                                                                  (one batch size)
    TEMPERATURE=0.7 ...                                                            (sampled; default greedy)

Checking steps are the engine's count (`GenerationOutput.checked_steps`); probes are counted in the method state.
docs/adaptive.md, `specee_v38`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp

import eej.decoding.specee as sp
from eej.config import SamplingConfig
from eej.decoding.engine import Engine
from eej.decoding.methods import build_method
from eej.weights.registry import load_model

TRAIN = "../shared/data/train/"
NOGATE = bool(os.environ.get("NOGATE"))


@dataclasses.dataclass(frozen=True)
class Counting(sp.SpecEE):
    """SpecEE that also counts, in its method state, its probes (steps checking every scheduled layer)."""

    def prefill(self, *args):
        logits, cache, state = super().prefill(*args)
        return logits, cache, {**state, "probes": jnp.zeros((), jnp.int32)}

    def step(self, s):
        econ = s.method_state["economics"]
        probe = econ.probe_due(self.probe_every) & (econ.force < 0)
        result = super().step(s)
        state = {**result.method_state, "probes": s.method_state["probes"] + probe.astype(jnp.int32)}
        return dataclasses.replace(result, method_state=state)


def training_prompts() -> list[str]:
    with open(TRAIN + "gsm8k_train.jsonl") as f:
        texts = [json.loads(line)["question"] for line in f][600:603]
    with open(TRAIN + "roleplay-simple-deduped-roleplay-instruct.json") as f:
        texts += [r["instruction"] for r in json.load(f)[600:603]]
    with open(TRAIN + "codegen-instruct.json") as f:
        texts += [r["instruction"] + ("\n" + r["input"] if r["input"] else "") for r in json.load(f)[600:602]]
    return texts


def main() -> None:
    if NOGATE:  # a prior so large that the bound never closes the path, and no discounting: check_gain sums
        sp.GAIN_DECAY, sp.GAIN_PRIOR, sp.GAIN_PRIOR_SD = 1.0, 1e5, 0.0
    model = load_model("smollm2-135m")
    strategy, params = build_method(model, "specee")
    strategy = Counting(**{f.name: getattr(strategy, f.name) for f in dataclasses.fields(strategy)})
    prompts = [model.tokenizer.encode_chat(t) for t in training_prompts()]
    engine = Engine(model, strategy, params)
    sampling = SamplingConfig(temperature=float(os.environ.get("TEMPERATURE", "0")))
    for batch in [int(x) for x in os.environ.get("BATCHES", "4 1").split()]:
        total = {"checking": 0, "probes": 0, "steps": 0, "exited": 0, "gain": 0.0}
        for i in range(0, len(prompts), batch):
            out = engine.generate(prompts[i:i + batch], max_new_tokens=128, sampling=sampling)
            ms = out.method_state
            gain = [float(x) for x in ms["check_gain"]]
            realized = gain[0] - sp.GAIN_PRIOR * sp.GAIN_PRIOR_STEPS  # meaningful with NOGATE only
            total["checking"] += max(out.checked_steps)  # one decision for the batch: its longest row saw every step
            total["probes"] += int(ms["probes"])
            total["gain"] += realized if NOGATE else 0.0
            total["steps"] += out.steps
            total["exited"] += sum(out.exited_steps)
            print(batch, i, out.steps, sum(out.exited_steps), round(realized, 1) if NOGATE else gain, flush=True)
        print("batch", batch, total, flush=True)


if __name__ == "__main__":
    main()
