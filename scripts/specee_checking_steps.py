"""How often SpecEE takes its checking path, and what those steps realized, on 8 prompts from the training sets
(three gsm8k questions, three role-play instructions, two code tasks; greedy, 128 new tokens) at batch 4 and 1.

    PYTHONSAFEPATH=1 .venv/bin/python scripts/specee_checking_steps.py            (the current rule)
    NOGATE=1 PYTHONSAFEPATH=1 .venv/bin/python scripts/specee_checking_steps.py   (the batch gate off: its
        check_gain then sums every checking step's realized gain, printed per prompt and in all)
    BATCHES=4 ...                                                                  (one batch size)

The checking count repeats the step's decision outside it (counted as if the gate applied at every batch size; at
batch 1 the step itself does not gate). docs/adaptive.md, `specee_v38`.
"""
import dataclasses
import json
import os
import jax.numpy as jnp
from eej.decoding.engine import Engine
from eej.decoding.methods import build_method
from eej.decoding.specee import SpecEE
from eej.weights.registry import load_model
import eej.decoding.specee as sp
if os.environ.get("NOGATE"): sp.GAIN_DECAY, sp.GAIN_PRIOR = 1.0, 1e5; sp.GAIN_PRIOR_SD = 0.0

@dataclasses.dataclass(frozen=True)
class Counting(SpecEE):
    def prefill(self, *a):
        logits, cache, state = super().prefill(*a)
        return logits, cache, {**state, "checking_steps": jnp.zeros((), jnp.int32), "probes": jnp.zeros((), jnp.int32)}
    def step(self, s):
        ms = s.method_state; econ = ms["economics"]
        scheduled = self.schedule(ms["recent_exits"], s.cfg)
        probe = econ.probe_due(self.probe_every)
        paying = self._checked_layers(econ, scheduled, s.cfg) & (sp.gain_bound(ms["check_gain"]) > 0)
        sched = jnp.where(probe, scheduled, paying)
        checking = jnp.any(sched) & (econ.force < 0)
        r = super().step(s)
        st = dict(r.method_state)
        st["checking_steps"] = ms["checking_steps"] + checking.astype(jnp.int32)
        st["probes"] = ms["probes"] + (probe & (econ.force < 0)).astype(jnp.int32)
        return dataclasses.replace(r, method_state=st)

model = load_model("smollm2-135m")
strategy, params = build_method(model, "specee")
strategy = Counting(**{f.name: getattr(strategy, f.name) for f in dataclasses.fields(strategy)})
T = "../shared/data/train/"
texts = [json.loads(l)["question"] for l in open(T + "gsm8k_train.jsonl")][600:603]
texts += [r["instruction"] for r in json.load(open(T + "roleplay-simple-deduped-roleplay-instruct.json"))[600:603]]
texts += [r["instruction"] + ("\n" + r["input"] if r["input"] else "") for r in json.load(open(T + "codegen-instruct.json"))[600:602]]
prompts = [model.tokenizer.encode_chat(t) for t in texts]
eng = Engine(model, strategy, params)
for b in [int(x) for x in os.environ.get('BATCHES', '4 1').split()]:
    tot = {"checking": 0, "probes": 0, "steps": 0, "exited": 0, "gain": 0.0}
    for i in range(0, 8 if b == 1 else 8, b):
        out = eng.generate(prompts[i:i + b], max_new_tokens=128)
        ms = out.method_state
        tot["checking"] += int(ms["checking_steps"]); tot["probes"] += int(ms["probes"])
        g = [float(x) for x in ms["check_gain"]]
        tot["gain"] += g[0] - sp.GAIN_PRIOR * sp.GAIN_PRIOR_STEPS if os.environ.get("NOGATE") else 0
        print(b, i, out.steps, sum(out.exited_steps), round(g[0] - sp.GAIN_PRIOR * sp.GAIN_PRIOR_STEPS, 1) if os.environ.get("NOGATE") else g, flush=True)
        tot["steps"] += out.steps; tot["exited"] += sum(out.exited_steps)
    print("batch", b, tot, flush=True)
