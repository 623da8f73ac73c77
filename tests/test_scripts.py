"""The benchmark scripts' own arithmetic (their measurements are recorded in docs/benchmarks.md)."""
import importlib.util

from tests.helpers import ROOT


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gemm_bench_counts_every_linear_weight_of_a_decoder_once():
    """2 FLOPs per weight of the decoder layers' linear layers (grouped-query attention: k and v
    narrower than q), as a Llama model built from the same config holds them."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    gemm = load_script("bench_gemm")
    config = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 3, "num_attention_heads": 8,
              "num_key_value_heads": 2, "vocab_size": 32}
    model = LlamaModel(LlamaConfig(**config))
    weights = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert gemm.forward_flops_per_token(config) == 2 * weights
