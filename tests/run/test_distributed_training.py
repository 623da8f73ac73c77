"""One run on two processes, as `accelerate launch` starts them (gloo DDP on a machine without
GPUs), against the same run in one process."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spectraqlora.config import compose, to_train_config
from spectraqlora.errors import UserError

# no dropout (no per-rank RNG); 10 steps, one evaluation at the end
SMOKE = ["model=tiny_llama", "trainer=smoke", "lora.dropout=0", "trainer.max_steps=10", "trainer.eval_steps=0",
         "dataset.eval_size=64"]


@pytest.mark.distributed
@pytest.mark.slow
def test_accelerate_launch_two_processes_trains_like_one(tmp_path):
    run_dir, scan = tmp_path / "ddp", f"scan.cache_dir={tmp_path / 'scan'}"
    accelerate = Path(sys.executable).parent / "accelerate"
    # two ranks x 4 rows = the single run's batch of 8
    result = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "spectraqlora.train", *SMOKE,
         "trainer.per_device_train_batch_size=4", scan, f"hydra.run.dir={run_dir}", "logger=wandb"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]

    ranks = dict(re.findall(r"rank (\d) of 2 trains (\d+ modules: \w+)", output))
    assert set(ranks) == {"0", "1"} and ranks["0"] == ranks["1"], ranks  # one selection
    assert output.count("spectrum scan:") == 1  # the main process scans, the other waits
    # the run dir is written once, by the main process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "scan"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1  # one W&B run, the main process's
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [row["step"] for row in logged if "train/loss" in row]
    assert train_steps == [5, 10]  # each step logged once, not once per rank
    ddp = json.loads((run_dir / "metrics.json").read_text())

    from tests.helpers import train_run as run

    single = run(to_train_config(compose(*SMOKE, scan)), tmp_path / "single")
    assert ddp["train_tokens"] == single["train_tokens"]  # the same rows per step
    assert ddp["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-4)
    assert ddp["eval_loss"] < ddp["eval_loss_before"] - 0.5


def test_fsdp_stores_4bit_weights_in_the_model_dtype(monkeypatch):
    """FSDP-QLoRA: bnb_4bit_quant_storage is the compute dtype, which must be model.dtype."""
    from spectraqlora.run.distributed import Launch
    from spectraqlora.run.modeling import bnb_config

    cfg = to_train_config(compose("model=tiny_llama", "model.dtype=bfloat16"))
    assert str(bnb_config(cfg.quant, cfg.model).bnb_4bit_quant_storage) == "torch.uint8"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as accelerate launch sets it for FSDP
    fsdp = Launch.from_env().fsdp
    assert fsdp and str(bnb_config(cfg.quant, cfg.model, fsdp).bnb_4bit_quant_storage) == "torch.bfloat16"
    cfg = to_train_config(compose("model=tiny_llama", "model.dtype=bfloat16", "quant.storage_dtype=float32"))
    with pytest.raises(UserError, match=r"quant.storage_dtype \(float32\) must equal model.dtype \(bfloat16\)"):
        bnb_config(cfg.quant, cfg.model, fsdp)


def test_a_sweep_is_refused_under_accelerate_launch(monkeypatch):
    from spectraqlora.run.distributed import Launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    launch = Launch.from_env()
    with pytest.raises(UserError, match="a sweep .* runs one process per trial"):
        launch.check_not_a_sweep(["-m", "hparams_search=snr_rank"])
    launch.check_not_a_sweep(["model=tiny_llama"])


def test_the_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    from spectraqlora.config import CONF_DIR

    def load(name):
        return load_config_from_file(f"{CONF_DIR}/accelerate/{name}.yaml")

    assert (load("single_gpu").distributed_type.value, load("single_gpu").num_processes) == ("NO", 1)
    assert load("ddp").distributed_type.value == "MULTI_GPU"
    fsdp = load("fsdp_qlora")
    assert fsdp.distributed_type.value == "FSDP" and fsdp.mixed_precision == "no"
    # what FSDP-QLoRA needs: frozen 4-bit and trainable weights in separate units, rank 0 loads
    assert fsdp.fsdp_config["fsdp_use_orig_params"] is False
    assert fsdp.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
    assert fsdp.fsdp_config["fsdp_sync_module_states"] is True
