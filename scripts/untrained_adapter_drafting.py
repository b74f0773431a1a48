"""How many steps adaptive Kangaroo drafts on the real model with an untrained adapter, by the cost of a one-token
draft: the diagnosis behind tests/test_adaptive.py::test_an_untrained_adapter_on_the_real_model_costs_only_the_probes.

    PYTHONSAFEPATH=1 .venv/bin/python scripts/untrained_adapter_drafting.py

Two untrained adapters at layer 2 (`init_adapter`): started near the logit lens (the model's final norm, projections
N(0, 0.02)), whose guesses agree with the model now and then, and with N(0, 1) projections, whose guesses are noise
(the test's). Each answers the test's prompt (greedy, 64 tokens) with the step costs measured here, then with c(1) / c(0)
set to 1.2, 1.1 and 1.05 (the measured c(k) - c(1) kept) by editing the measured table in a private cache directory,
as a loaded machine may measure them. Printed: the costs (relative), steps per chosen k, the replayed bound the test
allows (drafting steps while the prior fades, + 1), the final acceptance estimate and the drafting steps taken.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

CACHE = tempfile.mkdtemp()
os.environ["EEJ_CACHE_DIR"] = CACHE  # before eej reads it: the costs are measured afresh and edited here

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from eej.decoding import calibration  # noqa: E402
from eej.decoding.engine import Engine  # noqa: E402
from eej.decoding.kangaroo import Kangaroo  # noqa: E402
from eej.decoding.speculation import init_adapter  # noqa: E402
from eej.weights.registry import load_model, with_kernels  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from test_adaptive import _drafting_steps_while_the_prior_fades  # noqa: E402


def set_first_draft_cost(ratio: float) -> None:
    """Every measured table in the cache rewritten so that c(1) = ratio c(0), c(k) - c(1) as measured."""
    path = os.path.join(CACHE, calibration.STEP_TIMES_FILE)
    with open(path) as f:
        data = json.load(f)
    for entry in data.values():
        measured = entry.setdefault("measured_ms", list(entry["ms"]))
        entry["ms"] = [measured[0]] + [measured[0] * ratio + m - measured[1] for m in measured[1:]]
    with open(path, "w") as f:
        json.dump(data, f)


def main() -> None:
    model = with_kernels(load_model("smollm2-135m", kernels="xla"), "cpu")
    strategy = Kangaroo(exit_layer=2, exit_threshold=0.0, max_draft_steps=4)
    prompts = [model.tokenizer.encode_chat("Name three rivers in Europe.")]
    adapters = {"logit lens": init_adapter(model.cfg, 0, norm=np.asarray(model.params["final_norm"])),
                "N(0, 1)": init_adapter(model.cfg, 0, scale=1.0)}
    for ratio in (None, 1.2, 1.1, 1.05):
        if ratio is not None:
            set_first_draft_cost(ratio)
        for name, adapter in adapters.items():
            method_params = {"adapter": {k: jnp.asarray(v) for k, v in adapter.items()}}
            out = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=64, eos_ids=())
            ctl = out.method_state["controller"]
            costs = np.asarray(ctl.costs)
            print(f"c(1)/c(0) {'measured' if ratio is None else ratio}, {name}: costs {np.round(costs / costs[0], 3)}, "
                  f"chosen {np.asarray(ctl.chosen)}, bound {_drafting_steps_while_the_prior_fades(ctl.costs, 4) + 1}, "
                  f"acceptance {float(ctl.acceptance[0]):.3f}, drafting steps {sum(out.speculated_steps)}", flush=True)


if __name__ == "__main__":
    main()
