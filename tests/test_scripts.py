"""The benchmark scripts' own arithmetic (their measurements are recorded in docs/benchmarks.md)."""
import importlib.util
import json
import math
import statistics

import pytest

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


def test_train_bench_compares_two_runs_round_by_round():
    """Two runs on the same batches: the pooled difference as recorded, and the rerun spread from
    the rounds paired: log ratios of +-0.1 over 8 rounds -> SD 1.6 x 0.1069 / sqrt(8)."""
    bench = load_script("bench_train")
    a_rounds = [1.5, 1.7, 1.6, 1.6, 1.5, 1.7, 1.6, 1.6]
    b_rounds = [r * math.exp(0.1 if i % 2 else -0.1) for i, r in enumerate(a_rounds)]

    def result(rounds, pooled):
        return {"train_tokens_per_round": [400] * 8, "configs": {},
                "ratios": {"all/all_padded": {"rounds": rounds, "pooled": pooled}}}

    got = bench.compare(result(a_rounds, 1.60), result(b_rounds, 1.64))["all/all_padded"]
    sd = 1.6 * statistics.stdev([0.1, -0.1] * 4) / math.sqrt(8)
    assert got["difference"] == pytest.approx(0.04) and got["rerun_sd"] == pytest.approx(sd)
    assert got["items_for_within"] == math.ceil(8 * (1.96 * sd / 0.03) ** 2) > 8
    with pytest.raises(SystemExit, match="different batches"):
        bench.compare(result(a_rounds, 1.6), {**result(b_rounds, 1.6), "train_tokens_per_round": [401] * 8})
