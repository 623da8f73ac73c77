"""The real CUDA 4-bit path (QLoRA as users run it on a GPU): skipped where torch sees no GPU.

Run on a GPU machine with `pytest -m gpu`. These replace scripts/smoke.sh.
"""
import json
import math

import pytest
import torch

from spectraqlora.config import compose, to_train_config
from tests.helpers import train_run

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = ("model=tiny_llama", "trainer=smoke", "trainer.max_steps=6", "trainer.eval_steps=3",
        "trainer.logging_steps=3", "dataset.eval_size=32", "dataset.train_size=128")


def test_nf4_with_the_paged_optimizer_and_checkpointing_trains_on_the_gpu(tmp_path):
    from spectraqlora.run.loop import optimizer

    assert optimizer(None) == "paged_adamw_8bit"  # the default on CUDA
    metrics = train_run(to_train_config(compose(*TINY, "trainer.gradient_checkpointing=true")), tmp_path)
    assert metrics["train_steps"] == 6 and math.isfinite(metrics["eval_loss"])
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    # CUDA memory telemetry: in metrics.json and in every logged row of metrics.jsonl
    assert 0 < metrics["peak_allocated_gb"] <= metrics["peak_reserved_gb"]
    assert metrics["peak_mem_gb"] == metrics["peak_allocated_gb"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/loss" in r]
    assert logged and all(r["mem/peak_allocated_gb"] > 0 and "mem/peak_reserved_gb" in r for r in logged)


def test_the_base_is_4bit_on_the_gpu_and_adapters_train_in_its_compute_dtype():
    import bitsandbytes as bnb

    from spectraqlora.run import build
    from spectraqlora.spectrum.scanner import scan_and_select
    from spectraqlora.spectrum.selection import Selection

    cfg = to_train_config(compose(*TINY))
    inputs = build.load_inputs(cfg)
    table, chosen = scan_and_select(inputs.files, cfg)
    net, targets = build.new_model(inputs, cfg, Selection(table, chosen))
    layers = dict(net.named_modules())
    quantized = [m for m in layers.values() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in quantized)
    trained = [p for p in net.parameters() if p.requires_grad]
    assert trained and all(p.device.type == "cuda" for p in trained)


def test_the_scan_on_the_gpu_equals_the_scan_on_the_cpu():
    from spectraqlora.spectrum.scanner import compute
    from spectraqlora.store import checkpoint

    files = checkpoint.safetensors_files(checkpoint.resolve(to_train_config(compose()).model))  # MiniLM
    on_cpu, on_gpu = compute(files, device="cpu", progress=False), compute(files, device="cuda", progress=False)
    assert on_cpu.keys() == on_gpu.keys()
    for name, row in on_cpu.items():
        assert on_gpu[name]["snr"] == pytest.approx(row["snr"], rel=1e-4), name
        assert on_gpu[name]["type"] == row["type"]
