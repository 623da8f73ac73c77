"""The benchmark scripts' own arithmetic (their measurements are recorded in docs/benchmarks.md)."""
import importlib.util
import json

from tests.helpers import ROOT


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gemm_bench_counts_every_linear_weight_of_a_decoder_once(tmp_path):
    """Grouped-query attention (k and v a quarter of q's width), a gated MLP, 3 layers: each
    decoder linear once per layer, the embedding not at all, 2 FLOPs per weight."""
    gemm = load_script("bench_gemm")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 3,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32}))
    shapes = gemm.linear_shapes(tmp_path)
    assert shapes == {(64, 64): 6, (64, 16): 6, (64, 176): 6, (176, 64): 3}  # q o, k v, gate up, down
    assert gemm.forward_flops_per_token(shapes) == 2 * 3 * (2 * 64 * 64 + 2 * 64 * 16 + 3 * 64 * 176)
