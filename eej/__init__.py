"""eej: early exit and self-speculative decoding for LLMs, in JAX.

    import eej
    model = eej.load_model("smollm2-135m")
    engine = eej.Engine(model)                       # plain decoding; pass a strategy for a method
    out = engine.generate([model.tokenizer.encode_chat("Hi!")], max_new_tokens=64)
    print(model.tokenizer.decode(out.tokens[0]))
"""

from eej.config import ModelConfig, RopeConfig, SamplingConfig
from eej.decoding.engine import Engine, GenerationOutput
from eej.decoding.methods import build_method, known_methods
from eej.decoding.plain import Plain
from eej.decoding.strategy import StepResult, Strategy
from eej.weights.registry import Model, load_model

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "GenerationOutput",
    "Model",
    "ModelConfig",
    "Plain",
    "RopeConfig",
    "SamplingConfig",
    "StepResult",
    "Strategy",
    "build_method",
    "known_methods",
    "load_model",
]
