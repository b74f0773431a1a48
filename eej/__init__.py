"""eej: early exit and self-speculative decoding for LLMs, in JAX.

    import eej
    model = eej.load_model("smollm2-135m")          # eej's CPU kernels on a CPU (kernels="auto"; "xla" for XLA's)
    engine = eej.Engine(model)                       # plain decoding; pass a strategy for a method
    out = engine.generate([model.tokenizer.encode_chat("Hi!")], max_new_tokens=64)
    print(model.tokenizer.decode(out.tokens[0]))

The notebook API (eej.api) in a line each:

    eej.generate(model, "Hi!", method="plain")          # or any registered method, "NAME[:PRESET]"
    eej.compare(model, ["Hi!", "Name three rivers."], eej.api.ready_methods(model)).plot()
    eej.benchmark(model, "../shared/data/eval/spec_bench.jsonl", ["plain"], limit=2)
    eej.custom_model(params, layer_fn, num_heads=8, num_kv_heads=8, head_dim=64)   # your own model
"""

import os

# transformers, which wraps eej's tokenizers, prints an advisory "PyTorch was not found" line when it is imported
# without torch — eej needs no torch. Its own switch for advisory messages (not its warnings) keeps eej quiet.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from eej.api import Completions, benchmark, compare, generate  # noqa: E402
from eej.bench.report import BenchReport, load_results  # noqa: E402
from eej.config import ModelConfig, RopeConfig, SamplingConfig  # noqa: E402
from eej.decoding.engine import Engine, GenerationOutput  # noqa: E402
from eej.decoding.methods import build_method, known_methods  # noqa: E402
from eej.decoding.plain import Plain  # noqa: E402
from eej.decoding.strategy import StepInputs, StepResult, Strategy  # noqa: E402
from eej.weights.custom import custom_model  # noqa: E402
from eej.weights.registry import Model, load_model, with_kernels  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BenchReport",
    "Completions",
    "Engine",
    "GenerationOutput",
    "Model",
    "ModelConfig",
    "Plain",
    "RopeConfig",
    "SamplingConfig",
    "StepInputs",
    "StepResult",
    "Strategy",
    "benchmark",
    "build_method",
    "compare",
    "custom_model",
    "generate",
    "known_methods",
    "load_model",
    "load_results",
    "with_kernels",
]
