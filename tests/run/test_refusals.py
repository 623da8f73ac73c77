"""Bad input is refused in one clear line, before anything is trained, and leaves no result."""
import shutil
import sys

import pytest

from spectraqlora.errors import UserError
from spectraqlora.store import checkpoint
from tests.helpers import run_cli, train_run
from tests.helpers import smoke_config as config


def _tiny_llama_copy(tmp_path):
    src = checkpoint.resolve(config().model)
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _without_weights(tmp_path):
    dst = _tiny_llama_copy(tmp_path)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    return [f"model.name_or_path={dst}"]


def _truncated(tmp_path):
    dst = _tiny_llama_copy(tmp_path)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return [f"model.name_or_path={dst}"]


def _empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    return ["dataset=file", f"dataset.path={tmp_path / 'empty.jsonl'}"]


def _no_column(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"question": "a", "response": "b"}\n' * 20)
    return ["dataset=file", f"dataset.path={tmp_path / 'rows.jsonl'}"]


@pytest.mark.slow
@pytest.mark.parametrize("make, message", [
    (_without_weights, "holds no *.safetensors weights"),
    (_truncated, "is truncated"),
    (_empty_file, "is empty"),
    (_no_column, "its columns are: question, response"),
    (lambda _: ["selection=spectrum", "selection.top_frac=0.1", "selection.min_per_type=0"],
     "selection=spectrum keeps no module"),
    (lambda _: ["selection.module_types=[mlp.foo]"], "mlp.foo matches no module of this model"),
    (lambda _: ["selection=layers", "selection.layers=[9]"], "[9] out of range; this model has layers 0..3"),
    (lambda _: ["trainer.per_device_train_batch_size=-1"], "trainer.per_device_train_batch_size=-1 is out of range"),
    (lambda _: ["trainer.max_steps=-5"], "trainer.max_steps=-5 is out of range"),
    (lambda _: ["lora.dropout=1.0"], "lora.dropout=1.0 is out of range: expected a probability in [0, 1)"),
    (lambda _: ["lora.alpha=0"], "lora.alpha=0 is out of range: expected a positive integer"),
    (lambda _: ["lora.r=100000"], "rank 100000 is larger than the smaller dimension of model.layers."),
    (lambda _: ["dataset.max_length=2"], "dataset.max_length=2 leaves no response token in any of"),
])
def test_bad_input_is_one_clear_error_and_no_result(tmp_path, make, message):
    with pytest.raises(UserError) as caught:
        train_run(config(*make(tmp_path)), tmp_path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "metrics.json").exists()


def test_quantization_without_a_working_bitsandbytes_is_refused_early(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as on a broken install
    with pytest.raises(UserError, match="quant=nf4 needs a working bitsandbytes.*use quant=none"):
        train_run(config(), tmp_path)


def test_layers_out_of_range_are_refused_before_the_scan(tmp_path):
    with pytest.raises(UserError, match=r"\[9\] out of range; this model has layers 0..3"):
        train_run(config("selection=layers", "selection.layers=[9]"), tmp_path)
    assert not (tmp_path / "snr.json").exists()  # the checkpoint's config.json told


@pytest.mark.slow
def test_a_refused_command_prints_one_line_and_leaves_no_run_dir(tmp_path):
    result = run_cli("train", "+lora.rank=16", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown key lora.rank: did you mean lora.r? (the keys of lora are: r, alpha, "
        "dropout, bias, use_rslora, rank_allocation, r_min, r_max)"]
    assert list(tmp_path.iterdir()) == []  # no outputs/<date>/<time>/ left behind

