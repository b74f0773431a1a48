#!/usr/bin/env python
"""Expert offloading on the MoEfied SmolLM2: on-demand vs M2R2 ahead-of-time loading (docs/moe.md).

The MoE model is smollm2-135m split by `eej train moefy` (artifacts/smollm2-135m/moefy.npz); the fast
stream is the shipped M2R2 adapter (artifacts/smollm2-135m/m2r2.npz, trained on the dense model). Greedy,
batch 1, chat-formatted Spec-Bench prompts (first turns, spread over the categories), EOS ignored.

Exact (recorded by eej.experts.offload.OffloadedDecoder): expert-prediction accuracy (recall of the true
top-k) per layer distance for the slow residual and for the M2R2 fast stream, cache hit rate, bytes moved,
and that every run's tokens equal the in-memory MoE model's.
Modelled (eej.experts.timeline): decode time from the recorded loads, a host->device bandwidth
(`--bandwidths`; "measured" = the executor's own host->device copy of an expert on this machine) and compute costs split from
the in-memory MoE model's measured step time in proportion to the weight bytes each part reads.

    python scripts/moe_offload_bench.py [--prompts 8] [--calibration 2] [--max-new-tokens 64]
        [--capacities 12,14] [--top-k K] [--out benchmarks/results/moe_offload]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import jax
import numpy as np

from eej.bench.fidelity import sequence_argmax
from eej.bench.machine import load_average, machine_info
from eej.bench.questions import SPEC_BENCH, mt_bench_questions
from eej.bench.report import write_result
from eej.decoding.engine import Engine
from eej.decoding.m2r2 import load_fast_stream, target_depth
from eej.experts.moefy import load_moefied
from eej.experts.offload import OffloadedDecoder
from eej.experts.timeline import Costs, simulate
from eej.weights.artifacts import load_artifact
from eej.weights.registry import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recall(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over rows of |pred ∩ true| / k: pred, true [B, k]."""
    return float(np.mean([len(set(p) & set(t)) / len(t) for p, t in zip(pred.tolist(), true.tolist())]))


def slow_accuracy(records, num_layers: int) -> dict[int, float]:
    """d -> mean recall of layer l's router on layer l-d's residual (records made with record_slow)."""
    slow = {d: [] for d in range(1, num_layers)}
    for rec in records:
        for l in range(num_layers):
            for d in range(1, l + 1):
                slow[d].append(recall(rec.slow_predictions[l - d, l], rec.routed[l]))
    return {d: float(np.mean(v)) for d, v in slow.items()}


def fast_accuracy(records, num_layers: int, num_fast: int) -> np.ndarray:
    """[k, l] mean recall of layer l's router on fast state f_k (records made with prefetch="m2r2")."""
    fast = np.zeros((num_fast, num_layers))
    for rec in records:
        for l in range(num_layers):
            for k in range(num_fast):
                fast[k, l] += recall(rec.fast_predictions[k, l], rec.routed[l]) / len(records)
    return fast


def measure_put_bandwidth(dec: OffloadedDecoder, repeats: int = 200) -> float:
    """Host->device bytes/s of the executor's own expert copy (median over distinct experts)."""
    cfg = dec.cfg
    times = []
    for i in range(repeats):
        weights = dec.host_experts[i % cfg.num_layers][(i // cfg.num_layers) % cfg.num_experts]
        start = time.perf_counter()
        jax.block_until_ready(tuple(dec.copy_to_device(w) for w in weights))
        times.append(time.perf_counter() - start)
    return dec.expert_bytes / statistics.median(times)


def layer_bytes(layer: dict, names) -> int:
    return int(sum(layer[n].size * layer[n].dtype.itemsize for n in names if n in layer))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default=SPEC_BENCH, help="MT-Bench questions (first turns, one of each category in turn)")
    ap.add_argument("--moefy", default=os.path.join(ROOT, "artifacts", "smollm2-135m", "moefy.npz"))
    ap.add_argument("--m2r2", default=os.path.join(ROOT, "artifacts", "smollm2-135m", "m2r2.npz"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--calibration", type=int, default=2, help="of --prompts, used to pick each layer's fast state")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=None, help="experts per token (default: the artifact's)")
    ap.add_argument("--capacities", default="12,14", help="two (or more) cache sizes, experts per layer")
    ap.add_argument("--bandwidths", default="measured,1e9,4e9,16e9,64e9", help="host->device bytes/s for the time model")
    ap.add_argument("--prefetch-top", type=int, default=None, help="prefetch each row's top this many predicted experts (default k)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "moe_offload"))
    ap.add_argument("--note", default="")
    args = ap.parse_args()

    dense = load_model("smollm2-135m", kernels="xla")
    moe = load_moefied(dense, args.moefy, args.top_k)
    cfg = moe.cfg
    num_fast, fast = load_fast_stream(dense, args.m2r2)
    rate = float(load_artifact(args.m2r2, "m2r2", dense.cfg)[1]["settings"]["rate"])
    texts = [q.turns[0] for q in mt_bench_questions(args.questions, args.prompts)]
    prompts = [moe.tokenizer.encode_chat(t)[-256:] for t in texts]
    n = args.max_new_tokens
    capacities = [int(c) for c in args.capacities.split(",")]
    if not all(cfg.experts_per_token <= c <= cfg.num_experts for c in capacities):
        sys.exit(f"--capacities must be in [{cfg.experts_per_token}, {cfg.num_experts}] (top-{cfg.experts_per_token} "
                 f"of {cfg.num_experts}: batch 1 needs k distinct experts per layer), got {args.capacities}")

    # reference: the in-memory MoE model (all experts resident) and its measured decode speed
    engine = Engine(moe)
    reference, step_s = [], []
    engine.generate(prompts[:1], max_new_tokens=n, eos_ids=())  # compile
    for p in prompts:
        out = engine.generate([p], max_new_tokens=n, eos_ids=())
        reference.append(np.asarray(out.tokens[0][:n]))
        step_s.append(out.decode_seconds / max(1, n - 1))
    dense_engine = Engine(dense)
    dense_engine.generate(prompts[:1], max_new_tokens=n, eos_ids=())
    dense_step = statistics.median(dense_engine.generate([p], max_new_tokens=n, eos_ids=()).decode_seconds / max(1, n - 1) for p in prompts[:3])
    agreement = []
    for p, toks in zip(prompts, reference):
        teacher = sequence_argmax(dense, list(p) + toks.tolist())[len(p) - 1 : len(p) - 1 + n]
        agreement.append(float(np.mean(teacher == toks)))

    # calibration: which fast state predicts each layer best (on the first prompts, not scored)
    calib = OffloadedDecoder(moe, capacity=cfg.num_experts, prefetch="m2r2", fast=fast, predictor=[0] * cfg.num_layers)
    for p in prompts[: args.calibration]:
        calib.generate([p], n)
    fast_calib = fast_accuracy(calib.records, cfg.num_layers, num_fast)
    predictor = [int(np.argmax(fast_calib[:, l])) for l in range(cfg.num_layers)]
    scored = prompts[args.calibration :]
    scored_ref = reference[args.calibration :]

    # exact runs: (label, OffloadedDecoder options, fast layers run per token)
    modes = [("on-demand", dict(prefetch="none"), 0), ("next-layer", dict(prefetch="next-layer"), 0),
             (f"m2r2 (f_1..f_{num_fast})", dict(prefetch="m2r2", fast=fast, predictor=predictor), num_fast),
             ("m2r2 (f_1 only)", dict(prefetch="m2r2", fast=fast, fast_states=1, predictor=[0] * cfg.num_layers), 1)]
    runs = []
    tracer = None
    for capacity in capacities:
        for label, options, fast_used in modes:
            dec = OffloadedDecoder(moe, capacity=capacity, prefetch_top=args.prefetch_top,
                                   record_slow=(tracer is None and options["prefetch"] == "m2r2"), **options)
            identical = True
            for p, ref in zip(scored, scored_ref):
                got = dec.generate([p], n)[0]
                identical &= bool(np.array_equal(got, ref))
            if dec.record_slow:
                tracer = dec
            steps = len(dec.records)
            s = dec.cache.stats
            runs.append({"capacity": capacity, "mode": label, "fast_layers_run": fast_used, "identical_to_in_memory": identical,
                         "steps": steps, **s.as_dict(), "bytes_per_token": s.loads * dec.expert_bytes / steps,
                         "records": dec.records})
    slow_acc, fast_acc = slow_accuracy(tracer.records, cfg.num_layers), fast_accuracy(tracer.records, cfg.num_layers, num_fast)

    # costs: the in-memory step split by bytes read (decode is memory-bound)
    layer = moe.params["layers"][0]
    attn_b = layer_bytes(layer, ("attn_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "mlp_norm", "router"))
    expert_b = calib.expert_bytes
    active_b = cfg.experts_per_token * expert_b
    other_b = int(moe.params["lm_head"].size * 4 + moe.params["final_norm"].size * 4)
    total_b = cfg.num_layers * (attn_b + active_b) + other_b
    t_step = statistics.median(step_s)
    per_byte = t_step / total_b
    dense_layer_b = attn_b + 3 * cfg.hidden_size * dense.cfg.ffn_size * 4
    fast_layer_s = dense_layer_b * per_byte
    measured_bw = measure_put_bandwidth(calib)
    bandwidths = [measured_bw if b == "measured" else float(b) for b in args.bandwidths.split(",")]

    modelled = []
    for bw in bandwidths:
        for run in runs:
            costs = Costs(attn_s=attn_b * per_byte, experts_s=active_b * per_byte, other_s=other_b * per_byte,
                          fast_s=run["fast_layers_run"] * fast_layer_s, bandwidth=bw, expert_bytes=expert_b)
            times = simulate(run["records"], costs)
            modelled.append({"bandwidth_GBps": round(bw / 1e9, 2), "measured_bandwidth": bw == measured_bw,
                             "capacity": run["capacity"], "mode": run["mode"], "tokens_per_s": round(len(times) / sum(times), 2),
                             "vs_all_resident": round(t_step / (sum(times) / len(times)), 4)})
    for run in runs:
        run.pop("records")

    result = {
        "benchmark": "moe_offload",
        "machine": {**machine_info(), "load_average": load_average()},
        "note": args.note,
        "command": "python scripts/moe_offload_bench.py " + shlex.join(sys.argv[1:]),
        "model": cfg.name, "num_experts": cfg.num_experts, "experts_per_token": cfg.experts_per_token,
        "expert_bytes": expert_b, "fast_stream": {"layers": num_fast, "rate": rate,
                                                 "target_depths": [target_depth(k + 1, rate, cfg.num_layers) for k in range(num_fast)]},
        "prompts": len(prompts), "calibration_prompts": args.calibration, "max_new_tokens": n,
        "quality": {"token_agreement_vs_dense": round(float(np.mean(agreement)), 4)},
        "measured": {"in_memory_moe_step_s": t_step, "dense_step_s": dense_step, "device_put_bandwidth_GBps": round(measured_bw / 1e9, 3),
                     "host_memory": calib.host_memory},
        "cost_model": {"attn_s": attn_b * per_byte, "experts_s": active_b * per_byte, "other_s": other_b * per_byte,
                       "fast_layer_s": fast_layer_s, "split": "the in-memory MoE step time in proportion to the weight bytes each part reads"},
        "prefetch_top": args.prefetch_top or cfg.experts_per_token,
        "prediction_accuracy": {
            "slow_residual_by_distance": {str(d): round(v, 4) for d, v in slow_acc.items()},
            "m2r2_fast_by_layer": {str(l): round(float(fast_acc[predictor[l], l]), 4) for l in range(cfg.num_layers)},
            "m2r2_fast_state_per_layer": predictor,
            "m2r2_fast_table": [[round(float(x), 4) for x in row] for row in fast_acc],
        },
        "exact": runs,
        "modelled": modelled,
    }
    write_result(result, render(result), args.out)
    print(render(result))
    return 0


def render(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# Expert offloading: on-demand vs M2R2 ahead-of-time loading ({r['model']}, top-{r['experts_per_token']} of {r['num_experts']})",
        "",
        f"Machine: {m.get('cpu', m.get('cpu_model', '?'))}, {', '.join(m.get('devices', []))} (load average {m.get('load_average')}). "
        f"{r['note']}",
        f"Command: `{r['command']}`",
        "",
        f"{r['prompts']} Spec-Bench prompts ({r['calibration_prompts']} for calibration), {r['max_new_tokens']} tokens each, batch 1, greedy. "
        f"One expert = {r['expert_bytes'] / 1e6:.2f} MB (float32). MoEfied model's token agreement with the dense model: "
        f"{r['quality']['token_agreement_vs_dense']:.3f}. Fast stream: {r['fast_stream']['layers']} layers, rate {r['fast_stream']['rate']} "
        f"(target depths {r['fast_stream']['target_depths']}).",
        "",
        "## Expert-prediction accuracy (exact; recall of the true top-k)",
        "",
        "| layer distance d | slow residual (layer l's router on layer l-d's MLP input) |",
        "|---|---|",
    ]
    for d, v in r["prediction_accuracy"]["slow_residual_by_distance"].items():
        if int(d) in (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 29):
            lines.append(f"| {d} | {v:.3f} |")
    lines += ["", "M2R2 fast stream (predictions issued before layer 0, so layer l is predicted l layers ahead):", "",
              "| layer | " + " | ".join(str(l) for l in range(0, len(r["prediction_accuracy"]["m2r2_fast_by_layer"]), 3)) + " |",
              "|---" * (1 + len(range(0, len(r["prediction_accuracy"]["m2r2_fast_by_layer"]), 3))) + "|",
              "| recall | " + " | ".join(f"{r['prediction_accuracy']['m2r2_fast_by_layer'][str(l)]:.2f}"
                                        for l in range(0, len(r["prediction_accuracy"]["m2r2_fast_by_layer"]), 3)) + " |", ""]
    lines += ["## Cache (exact)", "", "| capacity | loading | hit rate | loads/token | MB moved/token | wasted prefetches | tokens = in-memory model |",
              "|---|---|---|---|---|---|---|"]
    for run in r["exact"]:
        lines.append(f"| {run['capacity']} | {run['mode']} | {run['hit_rate']:.3f} | {run['loads'] / run['steps']:.1f} | "
                     f"{run['bytes_per_token'] / 1e6:.1f} | {run['wasted_prefetches']} | {'yes' if run['identical_to_in_memory'] else 'NO'} |")
    lines += ["", f"## Decode speed (modelled from the exact loads; in-memory MoE step {r['measured']['in_memory_moe_step_s'] * 1e3:.1f} ms measured)", "",
              f"Experts held in `{r['measured'].get('host_memory', 'numpy')}` host memory; 'measured' bandwidth = the executor's own "
              "copy of one expert to the device. Compute costs: the measured step split in proportion to weight bytes read.", "",
              "| host->device GB/s | capacity | loading | tokens/s | vs all experts resident |", "|---|---|---|---|---|"]
    for row in r["modelled"]:
        bw = f"{row['bandwidth_GBps']}" + (" (measured)" if row["measured_bandwidth"] else "")
        lines.append(f"| {bw} | {row['capacity']} | {row['mode']} | {row['tokens_per_s']:.1f} | {row['vs_all_resident']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
