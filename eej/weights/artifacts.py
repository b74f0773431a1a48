"""Trained add-ons (adapters, predictors, LoRA weights) as single `.npz` files with their metadata.

An artifact holds a nested dict of arrays plus a JSON header: the method, its settings, the
fingerprint of the base model it was trained on, the command that reproduces it and training
metrics. Loading checks method and fingerprint, so an adapter for another model is a clear error.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from eej.config import ModelConfig

_META_KEY = "__eej_meta__"


class ArtifactError(ValueError):
    """The artifact is missing, corrupt, for another method, or for another model."""


def model_fingerprint(cfg: ModelConfig) -> dict[str, Any]:
    """The shape of a model: what an add-on must agree with (a mixture of experts adds its expert shape)."""
    moe = {"num_experts": cfg.num_experts, "moe_ffn_size": cfg.moe_ffn_size,  # not k: a runtime choice
           "shared_expert_ffn_size": cfg.shared_expert_ffn_size} if cfg.is_moe else {}
    return {
        "name": cfg.name,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "ffn_size": cfg.ffn_size,
        **moe,
    }


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        out: dict[str, np.ndarray] = {}
        for key, value in tree.items():
            if "/" in str(key):
                raise ArtifactError(f"artifact keys may not contain '/': {key!r}")
            out.update(_flatten(value, f"{prefix}{key}/"))
        return out
    return {prefix[:-1]: np.asarray(tree)}


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save_artifact(path: str, params: dict[str, Any], method: str, cfg: ModelConfig, **meta: Any) -> None:
    """Write `params` (nested dicts of arrays) with a header naming `method` and the model."""
    header = {"method": method, "model": model_fingerprint(cfg), **meta}
    flat = {k: np.asarray(v) for k, v in _flatten(params).items()}
    bad = [k for k, v in flat.items() if v.dtype.kind == "f" and not np.all(np.isfinite(v))]
    if bad:  # a diverged run: keep whatever artifact was there
        raise ArtifactError(f"not writing {path}: {', '.join(bad[:3])} hold non-finite values (nan or inf); the training "
                            "diverged — lower the learning rate, or restart from a good checkpoint")
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "wb") as f:
        np.savez_compressed(f, **flat, **{_META_KEY: np.frombuffer(json.dumps(header).encode(), np.uint8)})


def load_artifact(path: str, method: str, cfg: ModelConfig | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read an artifact -> (params, header); checks the method and (if `cfg` is given) the model."""
    if not os.path.isfile(path):
        raise ArtifactError(f"{method} artifact not found: {path}")
    try:
        with np.load(path) as data:
            flat = {k: data[k] for k in data.files}
    except Exception as e:
        raise ArtifactError(f"{path} is not a readable eej artifact ({e})") from e
    if _META_KEY not in flat:
        raise ArtifactError(f"{path} is not an eej artifact (no header)")
    header = json.loads(flat.pop(_META_KEY).tobytes().decode())
    if header.get("method") != method:
        raise ArtifactError(f"{path} holds a {header.get('method')!r} add-on, not {method!r}")
    if cfg is not None:
        want, got = model_fingerprint(cfg), header.get("model", {})
        keys = [*want, *(k for k in got if k not in want)]  # both ways: a MoE add-on does not fit a dense model
        diff = [k for k in keys if k != "name" and want.get(k) != got.get(k)]
        if diff:
            raise ArtifactError(
                f"{path} was trained for model {got.get('name')!r} and does not match {cfg.name!r} "
                f"({', '.join(f'{k}: {got.get(k)} vs {want.get(k)}' for k in diff)})"
            )
    return _unflatten(flat), header
