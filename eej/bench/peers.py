"""Peer baselines from transformers + torch (the optional `test` extra), run on the same prompt token ids.

  hf             `model.generate`, greedy (or sampling with the same settings), on the same checkpoint.
  hf-early-exit  transformers' assisted generation with `assistant_early_exit=LAYER` (default: the last
                 layer but one, the fastest on SmolLM2-135M, see docs/bench.md): the model drafts
                 with its first LAYER layers plus the final norm and LM head, and the full model verifies
                 (the LayerSkip-style self-speculative decoding of Elhoushi et al. 2024, arXiv
                 2404.16710). Lossless under greedy decoding. transformers' own defaults are kept for
                 the draft length (20, constant) and the draft confidence cut-off (0.4). transformers
                 supports it at batch size 1 only.

Both load the checkpoint with transformers in float32: for `smollm2-135m` the same GGUF file that eej
reads, otherwise the `.gguf` file or Hugging Face directory given as the model.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from eej.bench.contestants import Generation
from eej.config import SamplingConfig
from eej.weights.registry import Model, smollm2_path

PEERS = ("hf", "hf-early-exit")


class PeerError(ValueError):
    """A peer that can't run here (missing torch, a model transformers can't load, bad settings)."""


def parse_peers(spec: str | None) -> list[str]:
    """'hf,hf-early-exit' -> ['hf', 'hf-early-exit'] (validated, duplicates removed)."""
    if not spec:
        return []
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise PeerError(f"unknown peer {unknown[0]!r}; available: {', '.join(PEERS)}")
    return names


def _import_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise PeerError(
            f"peers need torch and transformers ({e.name} is missing): pip install torch, or install eej's test "
            "extra (pip install -e '.[test]')"
        ) from None
    return torch, transformers


def hf_checkpoint(model_arg: str) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for transformers' from_pretrained, from eej's --model argument."""
    if model_arg == "smollm2-135m":
        path = smollm2_path()
        return os.path.dirname(path), os.path.basename(path)
    if model_arg.endswith(".gguf") and os.path.isfile(model_arg):
        return os.path.dirname(os.path.abspath(model_arg)), os.path.basename(model_arg)
    if os.path.isdir(model_arg):
        return model_arg, None
    raise PeerError(
        f"peers run transformers on a real checkpoint; model {model_arg!r} is not one "
        "(use smollm2-135m, a .gguf file or a Hugging Face checkpoint directory)"
    )


class HFPeer:
    """transformers `generate` on a loaded torch model; `early_exit_layer` set = assisted early-exit drafting."""

    kind = "peer"

    def __init__(self, name: str, hf_model: Any, torch: Any, eos_ids: Sequence[int], pad_id: int, early_exit_layer: int | None):
        self.name = name
        self.model = hf_model
        self.torch = torch
        self.eos_ids = list(eos_ids)
        self.pad_id = pad_id
        self.early_exit_layer = early_exit_layer

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingConfig, seed: int,
                 ignore_eos: bool = False) -> Generation:
        torch = self.torch
        if self.early_exit_layer is not None and len(prompts) > 1:
            raise PeerError("hf-early-exit: transformers' assisted generation runs batch size 1 only; use --batch-size 1")
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: what transformers expects for decoder-only batches
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        kwargs: dict[str, Any] = dict(  # eos_token_id=None: no stop token (not the model's default)
            max_new_tokens=max_new_tokens, eos_token_id=None if ignore_eos else self.eos_ids, pad_token_id=self.pad_id,
            min_new_tokens=0,
        )
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or None, top_p=sampling.top_p)
        if self.early_exit_layer is not None:
            kwargs["assistant_early_exit"] = self.early_exit_layer
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        seconds = time.perf_counter() - start
        rows = []
        for row in out[:, width:].tolist():
            cut = len(row) if ignore_eos else next((j + 1 for j, t in enumerate(row) if t in self.eos_ids), len(row))
            rows.append(row[:cut])
        return Generation(tokens=rows, seconds=seconds)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": self.kind, "library": f"transformers {self._transformers_version()}",
                                "torch": self.torch.__version__, "torch_threads": self.torch.get_num_threads()}
        if self.early_exit_layer is not None:
            gc = self.model.generation_config  # unset fields fall back to transformers' defaults (20, constant, 0.4)
            info.update(
                assistant_early_exit=self.early_exit_layer,
                num_assistant_tokens=getattr(gc, "num_assistant_tokens", None) or 20,
                num_assistant_tokens_schedule=getattr(gc, "num_assistant_tokens_schedule", None) or "constant",
                assistant_confidence_threshold=getattr(gc, "assistant_confidence_threshold", None) or 0.4,
            )
        return info

    @staticmethod
    def _transformers_version() -> str:
        import transformers

        return transformers.__version__


def load_peers(
    names: Sequence[str],
    model_arg: str,
    model: Model,
    early_exit_layer: int | None = None,
    threads: int = 0,
) -> list[HFPeer]:
    """The named peers, sharing one transformers model (float32) loaded from eej's --model argument.

    early_exit_layer: the hf-early-exit draft depth; None = num_layers - 1, the fastest depth measured
    on SmolLM2-135M (untrained shallow exits are rarely accepted; see docs/bench.md).

    threads: torch's intra-op threads (0: torch's default, one per core). On a machine shared with other
    busy processes torch's OpenMP threads can slow down severalfold (see docs/bench.md); 1 avoids that.
    """
    if not names:
        return []
    if early_exit_layer is None:
        early_exit_layer = model.cfg.num_layers - 1
    if "hf-early-exit" in names and not 1 <= early_exit_layer < model.cfg.num_layers:
        raise PeerError(f"--early-exit-layer must be in 1..{model.cfg.num_layers - 1}, got {early_exit_layer}")
    if threads < 0:
        raise PeerError(f"--peer-threads must be >= 0, got {threads}")
    directory, gguf_file = hf_checkpoint(model_arg)
    torch, transformers = _import_torch()
    if threads:
        torch.set_num_threads(threads)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()
    eos, pad = model.cfg.eos_ids, model.cfg.pad_id
    return [HFPeer(n, hf_model, torch, eos, pad, early_exit_layer if n == "hf-early-exit" else None) for n in names]
