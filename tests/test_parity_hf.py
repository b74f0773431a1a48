"""Parity of eej's model with transformers + torch (the reference implementation).

Tiny random Llama / Qwen2 / Mistral checkpoints (several RoPE scalings) and mixtures of experts
(Mixtral, Qwen2-MoE; experts saved one by one and fused) written by transformers and read back by
eej's safetensors loader; the real SmolLM2-135M read from its GGUF by both eej and
transformers' own GGUF loader. Logits must match tightly and greedy generation token for token.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from eej.config import SamplingConfig  # noqa: E402
from eej.decoding.engine import Engine  # noqa: E402
from eej.model.cache import init_cache  # noqa: E402
from eej.model.transformer import forward  # noqa: E402
from eej.weights.hf_checkpoint import read_hf_checkpoint  # noqa: E402
from eej.weights.byte_tokenizer import byte_tokenizer  # noqa: E402
from eej.weights.registry import Model, smollm2_path, to_device  # noqa: E402
from eej.testing import write_gguf, write_hf_checkpoint  # noqa: E402
from eej.weights.gguf_file import read_gguf  # noqa: E402

GEN_TOKENS = 64


def _hf_tiny(kind: str, tmp_path, save_original_format: bool = True, **extra):
    torch.manual_seed(0)
    common = dict(
        vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    common.update(extra)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common)
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "mixtral":
        cfg = transformers.MixtralConfig(**{**common, "intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2})
        model = transformers.MixtralForCausalLM(cfg)
    elif kind == "qwen2_moe":
        moe = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
        cfg = transformers.Qwen2MoeConfig(**{**common, **moe, **extra})
        model = transformers.Qwen2MoeForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # larger-than-default weights so that logits are not all near zero
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    model.save_pretrained(tmp_path, save_original_format=save_original_format)
    return model.eval()


def _eej_from_dir(path) -> Model:
    cfg, params = read_hf_checkpoint(str(path))
    return Model(cfg=cfg, params=to_device(params, cfg), tokenizer=byte_tokenizer())


def _eej_logits(model: Model, ids: list[int]) -> np.ndarray:
    tokens = jnp.asarray([ids], jnp.int32)
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    cache = init_cache(model.cfg, 1, len(ids))
    logits, _ = forward(model.params, tokens, positions, cache, model.cfg)
    return np.asarray(logits[0])


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def _check(hf_model, model: Model, prompt: list[int], atol: float, rtol: float = 1e-4) -> None:
    hf_tokens = _hf_greedy(hf_model, prompt, GEN_TOKENS)
    seq = prompt + hf_tokens
    with torch.no_grad():
        ref = hf_model(torch.tensor([seq])).logits[0].float().numpy()
    ours = _eej_logits(model, seq)
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=rtol)
    out = Engine(model).generate([prompt], max_new_tokens=GEN_TOKENS, sampling=SamplingConfig(), eos_ids=())
    assert out.tokens[0] == hf_tokens


CASES = {
    "llama": ("llama", {}),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-rope-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "llama-rope-llama3": (
        "llama",
        dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64, "rope_theta": 500000.0}),
    ),
    "llama-rope-yarn": (
        "llama",
        dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                              "rope_theta": 10000.0}),
    ),
    "qwen2-bias": ("qwen2", {}),
    "mistral-sliding-window": ("mistral", dict(sliding_window=12)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_checkpoint_matches_transformers(case, tmp_path):
    kind, extra = CASES[case]
    hf_model = _hf_tiny(kind, tmp_path, **extra)
    model = _eej_from_dir(tmp_path)
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, 300, size=11).tolist()
    _check(hf_model, model, prompt, atol=2e-4)


MOE_CASES = {
    "mixtral": ("mixtral", {}),
    "mixtral-fused-sliding-window": ("mixtral", dict(save_original_format=False, sliding_window=12)),
    "qwen2-moe-shared-expert": ("qwen2_moe", dict(norm_topk_prob=False)),
    "qwen2-moe-norm-topk-fused": ("qwen2_moe", dict(norm_topk_prob=True, save_original_format=False)),
}


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_tiny_moe_checkpoint_matches_transformers(case, tmp_path):
    kind, extra = MOE_CASES[case]
    hf_model = _hf_tiny(kind, tmp_path, **extra)
    model = _eej_from_dir(tmp_path)
    assert model.cfg.is_moe
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 300, size=n).tolist() for n in (11, 4)]
    want = [_hf_greedy(hf_model, p, GEN_TOKENS) for p in prompts]
    seq = prompts[0] + want[0]
    with torch.no_grad():
        ref = hf_model(torch.tensor([seq])).logits[0].float().numpy()
    np.testing.assert_allclose(_eej_logits(model, seq), ref, atol=2e-4, rtol=1e-4)
    # a ragged batch of two: prefill runs every expert (dense path), decoding reads the chosen ones (gathered)
    out = Engine(model).generate(prompts, max_new_tokens=GEN_TOKENS, sampling=SamplingConfig(), eos_ids=())
    assert out.tokens == want


def test_mixed_dense_and_moe_qwen2_moe_is_rejected(tmp_path):
    from eej.weights.hf_checkpoint import CheckpointError

    _hf_tiny("qwen2_moe", tmp_path, mlp_only_layers=[1])
    with pytest.raises(CheckpointError, match="mlp_only_layers=\\[1\\].*not supported"):
        read_hf_checkpoint(str(tmp_path))


@pytest.mark.real_model
def test_smollm2_matches_transformers_gguf(real_model):
    import os

    path = smollm2_path()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    prompt = real_model.tokenizer.encode_chat("Name three colours of the rainbow.")
    _check(hf_model, real_model, prompt, atol=1e-3, rtol=1e-4)


@pytest.mark.real_model
def test_smollm2_tokenizer_matches_transformers_gguf(real_model):
    import os

    path = smollm2_path()
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    texts = [
        "Hello world! 12345 numbers,  spaces\n\nnewline",
        "<|im_start|>user\nhi<|im_end|>",
        "naïve café — 日本語 🙂 x=3.14159",
        "def f(x):\n    return x**2  # tab\there",
        "  leading and trailing  ",
        "I'm you're they'll 1,000,000 $5.99 2024-01-01",
    ]
    for text in texts:
        ours = real_model.tokenizer.encode(text)
        assert ours == ref.encode(text, add_special_tokens=False), text
        assert real_model.tokenizer.decode(ours, skip_special_tokens=False) == text
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "ok?"}]
    assert real_model.tokenizer.chat_prompt(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


# ----------------------------------------------------------------------------- checkpoints that contradict config.json


def test_a_checkpoint_written_without_torch_loads(tmp_path):
    write_hf_checkpoint(tmp_path, tensors={"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)})
    cfg, params = read_hf_checkpoint(str(tmp_path))
    assert (cfg.num_layers, cfg.ffn_size, cfg.vocab_size, cfg.num_kv_heads) == (2, 48, 300, 2)
    assert params["layers"]["w_gate"].shape == (2, 32, 48) and params["lm_head"].shape == (32, 300)


_L0 = "model.layers.0."
BAD_CHECKPOINTS = {
    "extra layer": ({"num_hidden_layers": 1}, {}, "tensor model.layers.1.input_layernorm.weight \\(and 8 more\\) "
                    "is not part of the model config.json describes \\(layer 1 is beyond num_hidden_layers=1\\)"),
    "ffn size": ({"intermediate_size": 64}, {}, f"tensor {_L0}mlp.gate_proj.weight has shape \\[48, 32\\]; config.json "
                 "gives \\[64, 32\\] \\(intermediate_size, hidden_size\\)"),
    "vocab size": ({"vocab_size": 280}, {}, "tensor model.embed_tokens.weight has shape \\[300, 32\\]; .*vocab_size"),
    "head": ({}, {"lm_head.weight": np.zeros((300, 16), np.float32)}, "tensor lm_head.weight has shape \\[300, 16\\]"),
    "kv heads": ({"num_key_value_heads": 4}, {}, f"{_L0}self_attn.k_proj.weight has shape .*num_key_value_heads"),
    "mlp_bias": ({"mlp_bias": True}, {}, "config.json: key 'mlp_bias' is true: eej's MLP has no biases"),
    "llama attention bias": ({"attention_bias": True}, {}, "key 'attention_bias' is true: .*o_proj bias"),
    "stray bias": ({}, {f"{_L0}mlp.down_proj.bias": np.zeros(32, np.float32)},
                   f"tensor {_L0}mlp.down_proj.bias is not part .*no such bias"),
    "missing tensor": ({}, {f"{_L0}mlp.up_proj.weight": None}, f"tensor {_L0}mlp.up_proj.weight is missing"),
    "missing key": ({"num_hidden_layers": None}, {}, "config.json: key 'num_hidden_layers' is missing"),
    "bad key": ({"hidden_size": "32"}, {}, "key 'hidden_size' must be an integer, got '32'"),
    "bad eps": ({"rms_norm_eps": "tiny"}, {}, "key 'rms_norm_eps' must be a finite number"),
    "bad eos": ({"eos_token_id": [2, "</s>"]}, {}, "key 'eos_token_id' must be a token id or a list of them"),
    "bad pad": ({"pad_token_id": -1}, {}, "key 'pad_token_id' must be >= 0, got -1"),
    "heads": ({"num_attention_heads": 3, "head_dim": 8}, {}, "num_heads \\(3\\) must be a multiple of num_kv_heads"),
    "qwen2 mixed window": ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
                            "max_window_layers": 1}, {}, "layers \\[1\\] have a sliding window and the others not"),
    "nan": ({}, {f"{_L0}self_attn.v_proj.weight": np.full((16, 32), np.nan, np.float32)},
            f"model.safetensors: tensor {_L0}self_attn.v_proj.weight holds non-finite values"),
    "inf in an f16 tensor": ({}, {"model.norm.weight": np.full(32, np.inf, np.float16)}, "model.norm.weight holds non"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_checkpoints_that_contradict_their_config_are_refused(case, tmp_path):
    config, tensors, message = BAD_CHECKPOINTS[case]
    write_hf_checkpoint(tmp_path, config, tensors)
    with pytest.raises(ValueError, match=message):
        read_hf_checkpoint(str(tmp_path))


def test_qwen2_sliding_window_in_every_layer_or_none(tmp_path):
    base = {"model_type": "qwen2", "sliding_window": 8}
    for extra, window in (({"use_sliding_window": True, "max_window_layers": 0}, 8),
                          ({"use_sliding_window": True}, None),  # max_window_layers 28 >= layers: no layer slides
                          ({"use_sliding_window": False, "max_window_layers": 0}, None)):
        tensors = {f"model.layers.{i}.self_attn.{p}_proj.bias": np.zeros(n, np.float32)
                   for i in range(2) for p, n in (("q", 32), ("k", 16), ("v", 16))}
        write_hf_checkpoint(tmp_path, {**base, **extra}, tensors)
        assert read_hf_checkpoint(str(tmp_path))[0].sliding_window == window, extra


@pytest.mark.parametrize("damage, message", [
    (lambda raw: (10**15).to_bytes(8, "little") + raw[8:], "not a safetensors file \\(header length 1000000000000000"),
    (lambda raw: raw[:5], "not a safetensors file"),
    (lambda raw: raw[:8] + b"\xff" * (len(raw) - 8), "header is not a JSON object"),
    (lambda raw: raw[:-100], "data_offsets .* don't match its size or the file's"),
])
def test_a_damaged_safetensors_file_is_refused(tmp_path, damage, message):
    write_hf_checkpoint(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(ValueError, match=message):
        read_hf_checkpoint(str(tmp_path))


def test_a_bad_checkpoint_is_one_line_and_exit_2_from_the_cli(tmp_path, capsys):
    from eej.cli import main

    write_hf_checkpoint(tmp_path, {"intermediate_size": 64})
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eej: error: ") and "mlp.gate_proj.weight has shape [48, 32]" in err[0]


def test_a_gguf_written_here_loads(tmp_path):
    write_gguf(tmp_path / "m.gguf")
    cfg, params, tokenizer = read_gguf(str(tmp_path / "m.gguf"))
    assert (cfg.vocab_size, cfg.num_layers, cfg.ffn_size, cfg.num_kv_heads) == (300, 2, 48, 2)
    assert params["layers"]["w_down"].shape == (2, 48, 32) and tokenizer.decode(tokenizer.encode("hi")) == "hi"


BAD_GGUFS = {
    "garbage f16 data": ({}, {"blk.1.ffn_up.weight": np.full((48, 32), 0xFFFF, np.uint16).view(np.float16)},
                         "m.gguf: tensor blk.1.ffn_up.weight holds non-finite values"),
    "nan": ({}, {"token_embd.weight": np.full((300, 32), np.nan, np.float32)}, "tensor token_embd.weight holds non"),
    "extra block": ({"block_count": 1}, {}, "tensor blk.1.attn_k.weight \\(and 8 more\\) is not part of the model"),
    "llama 3 rope table": ({}, {"rope_freqs.weight": np.ones(4, np.float32)}, "tensor rope_freqs.weight is not part"),
    "output bias": ({}, {"blk.0.attn_output.bias": np.zeros(32, np.float32)}, "blk.0.attn_output.bias is not part"),
    "ffn size": ({"feed_forward_length": 64}, {}, "blk.0.ffn_gate.weight has shape \\[48, 32\\]; the metadata gives"),
    "missing key": ({"feed_forward_length": None}, {}, "metadata llama.feed_forward_length must be a positive integer"),
    "missing tensor": ({}, {"blk.1.attn_v.weight": None}, "tensor blk.1.attn_v.weight is missing"),
    "vocab size": ({"vocab_size": 299}, {}, "token_embd.weight has 300 rows; metadata llama.vocab_size is 299"),
    "partial rotary": ({"rope.dimension_count": 4}, {}, "partial rotary embeddings are not supported"),
    "rope factor": ({"rope.scaling.type": "linear"}, {}, "metadata llama.rope.scaling.factor must be a positive"),
}


@pytest.mark.parametrize("case", sorted(BAD_GGUFS))
def test_ggufs_that_contradict_their_metadata_are_refused(case, tmp_path):
    metadata, tensors, message = BAD_GGUFS[case]
    write_gguf(tmp_path / "m.gguf", metadata, tensors)
    with pytest.raises(ValueError, match=message):
        read_gguf(str(tmp_path / "m.gguf"))


def test_a_gguf_without_a_vocabulary_is_refused(tmp_path):
    write_gguf(tmp_path / "m.gguf", vocabulary=False)
    with pytest.raises(ValueError, match="m.gguf: the tokenizer metadata .*tokenizer.ggml.tokens is missing"):
        read_gguf(str(tmp_path / "m.gguf"))


def test_a_gguf_of_garbage_is_one_line_and_exit_2_from_the_cli(tmp_path, capsys):
    from eej.cli import main

    garbage = np.frombuffer(np.random.default_rng(0).bytes(300 * 32 * 2), np.float16).reshape(300, 32).copy()
    garbage[7, 3] = np.inf  # random bytes hold non-finite halves often; make sure of one
    write_gguf(tmp_path / "m.gguf", tensors={"output.weight": garbage})
    assert main(["generate", "--model", str(tmp_path / "m.gguf"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eej: error: ") and "tensor output.weight holds non-finite" in err[0]


def test_a_missing_or_damaged_tokenizer_is_one_line_and_exit_2(tmp_path, capsys):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models

    from eej.cli import main

    write_hf_checkpoint(tmp_path)
    argv = ["generate", "--model", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "2"]

    def error() -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("eej: error: "), err
        return err[0]

    assert "has no tokenizer.json" in error()
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert "tokenizer.json or tokenizer_config.json can't be read" in error()
    words = RawTokenizer(models.WordLevel({"h": 0, "i": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "two"}')
    assert "generation_config.json: eos_token_id must be a token id" in error()
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2]}')
    assert main(argv) == 0  # the checkpoint itself is fine
