"""eej: early exit and self-speculative decoding for LLMs, in JAX.

    import eej
    model = eej.load_model("smollm2-135m")
    engine = eej.Engine(model)                       # plain decoding; pass a strategy for a method
    out = engine.generate([model.tokenizer.encode_chat("Hi!")], max_new_tokens=64)
    print(model.tokenizer.decode(out.tokens[0]))

The notebook API (eej.api) in a line each:

    eej.generate(model, "Hi!", method="plain")          # or any registered method, "NAME[:PRESET]"
    eej.compare(model, ["Hi!", "Name three rivers."], eej.api.ready_methods(model)).plot()
    eej.benchmark(model, "../shared/data/eval/spec_bench.jsonl", ["plain"], limit=2)
    eej.custom_model(params, layer_fn, num_heads=8, num_kv_heads=8, head_dim=64)   # your own model
"""

from eej.api import Completions, benchmark, compare, generate
from eej.bench.report import BenchReport, load_results
from eej.config import ModelConfig, RopeConfig, SamplingConfig
from eej.decoding.engine import Engine, GenerationOutput
from eej.decoding.methods import build_method, known_methods
from eej.decoding.plain import Plain
from eej.decoding.strategy import StepInputs, StepResult, Strategy
from eej.weights.custom import custom_model
from eej.weights.registry import Model, load_model

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
]
