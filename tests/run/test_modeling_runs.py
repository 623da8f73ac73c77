"""Adapters on disk and new heads, checked on small runs."""

import pytest

from spectraqlora.errors import UserError
from spectraqlora.run import modeling
from spectraqlora.store import checkpoint
from tests.helpers import smoke_config as config
from tests.helpers import train_run


def test_pickle_adapters_are_refused_unless_allowed(tmp_path):
    from transformers import AutoModelForCausalLM

    path = checkpoint.resolve(config().model)
    cfg = config()
    net = modeling.add_lora(AutoModelForCausalLM.from_pretrained(path),
                            ["model.layers.0.self_attn.q_proj"], cfg.lora, cfg.model)
    net.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    with pytest.raises(UserError, match=r"pickle adapter \(adapter_model.bin\).*allow_pickle=true"):
        modeling.load_adapter(AutoModelForCausalLM.from_pretrained(path), tmp_path)
    loaded = modeling.load_adapter(AutoModelForCausalLM.from_pretrained(path), tmp_path, allow_pickle=True)
    assert "model.layers.0.self_attn.q_proj" in str(loaded.targeted_module_names)


@pytest.mark.slow
def test_a_decoder_lm_as_a_classifier_trains_its_new_score_head_whole_and_unquantized(tmp_path):
    """model.task=classification with no model.head_modules: the new head (Llama: `score`) is
    kept out of 4-bit and trained whole, not left random and frozen."""
    from safetensors import safe_open

    metrics = train_run(config("model.task=classification", "trainer.max_steps=4", "trainer.eval_steps=0",
                               "trainer.save_steps=0"), tmp_path)
    assert 0 <= metrics["eval_accuracy"] <= 1
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert any(k.endswith("score.weight") for k in saved), saved  # the head is in the adapter
    assert modeling.heads(config("model.task=classification").model) == modeling.NEW_HEADS
    assert "score" in modeling.bnb_config(config().quant, config("model.task=classification").model).llm_int8_skip_modules

