"""Config schemas: every key, its type, default, meaning and allowed range, checked before
anything heavy loads. (Over 300 lines on purpose: each key's default, help and check sit side by
side here, the one place they live; conf/ options hold only what they change.)

The YAML files under conf/ fill these dataclasses (conf/train.yaml names `train_schema` first in
its defaults list), so a misspelt key or a wrong type is refused by Hydra while composing, and
`validate` refuses out-of-range values with one line naming the key.
"""
from __future__ import annotations

import dataclasses
import enum
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from spectraqlora import resolvers
from spectraqlora.cli import nearest
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
    alpha = "alpha"  # the heavy-tail exponent (WeightWatcher's alpha), per type like spectrum
    random = "random"
    layers = "layers"
    all = "all"
    none = "none"  # no adapters: only model.head_modules train (the linear-probe baseline)


class AlphaOrder(str, enum.Enum):
    high_first = "high_first"  # AlphaLoRA: a high alpha marks a layer its pre-training left less trained
    low_first = "low_first"


class RankAllocation(str, enum.Enum):
    uniform = "uniform"
    snr = "snr"


class Bias(str, enum.Enum):  # peft's LoraConfig.bias
    none = "none"
    all = "all"
    lora_only = "lora_only"


class NonFinite(str, enum.Enum):
    error = "error"  # stop the run
    skip = "skip"  # drop that step and count it


class Batching(str, enum.Enum):
    auto = "auto"  # padding_free where it is exact for the model, else padded
    padded = "padded"  # each batch padded to its longest row
    padding_free = "padding_free"  # a batch's rows as one sequence, positions restarting per row
    grouped = "grouped"  # rows of similar length batched together (shuffled in groups)


class Logger(str, enum.Enum):
    none = "none"
    wandb = "wandb"


DTYPES = ("float32", "bfloat16", "float16")
# transformers.SchedulerType's values (tests/test_config.py keeps them equal), here so that a
# config error needs no transformers import
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay", "greedy")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit", "adafactor", "sgd")


def knob(default=MISSING, help: str = "", check=None, accepted: str = "", factory=None):
    """A config field: its default, what it means, and when set, the range check `validate`
    applies (check(value) true, else the error says `expected <accepted>`)."""
    metadata = {"help": help, **({"check": (check, accepted)} if check else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def positive(what: str = "integer"):
    return {"check": lambda v: v > 0, "accepted": f"a positive {what}"}


def optional_positive():
    return {"check": lambda v: v is None or v > 0, "accepted": "a positive integer or null"}


def _dtype(null: bool = False, extra: tuple = ()):
    names = ", ".join(DTYPES + extra)
    return {"check": lambda v: (null and v is None) or v in DTYPES + extra,
            "accepted": f"null or one of {names}" if null else f"one of {names}"}


@dataclass
class ModelConfig:
    name_or_path: str = knob(help="a hub id or a local checkpoint dir")
    task: Task = knob(Task.causal_lm, "classification (a new head), causal_lm or seq2seq")
    revision: Optional[str] = knob(None, "hub revision (branch, tag or commit)")
    dtype: str = knob("bfloat16", "dtype of what stays unquantized (norms, embeddings, heads)", **_dtype())
    trust_remote_code: bool = knob(False, "run the checkpoint's own model code (off unless set)")
    skip_quant_modules: List[str] = knob(
        help="modules kept out of quantization; heads that are new (not in the checkpoint) must be here",
        factory=lambda: ["lm_head"])
    head_modules: List[str] = knob(
        help="modules trained whole next to the adapters; empty with task=classification: the new "
             "head, under the names transformers gives it (score, classifier)", factory=list)
    random_init: Optional[Dict[str, Any]] = knob(
        None, "when set and name_or_path does not exist yet: a random-init model of this config "
              "(AutoConfig.for_model kwargs, model_type included), saved there once")
    tokenizer: Optional[str] = knob(None, "where the tokenizer comes from (hub id or dir) when the checkpoint "
                                          "dir has none; random_init: the tokenizer it is built with "
                                          "(null: the checkpoint's own)")
    gguf_file: Optional[str] = knob(None, "a GGUF file to convert (once) into a safetensors checkpoint at name_or_path")
    hub_id: Optional[str] = knob(None, "model cards: the hub id the weights come from (null: name_or_path when it is one)")
    license: Optional[str] = knob(None, "model cards: the base's license (null: the checkpoint's README or GGUF says)")


@dataclass
class DatasetConfig:
    name: str = knob("synthetic", "a name for reports")
    path: str = knob(MISSING, "synthetic (generated here), a local file path, or a hub dataset id; every "
                              "dataset preset sets it (dataset=file asks for it)")
    text_column: str = knob("text", "classification: the text")
    label_column: str = knob("label", "classification: the label")
    label_names: Optional[List[str]] = knob(
        None, "classification: the classes, in id order (a row with any other label is refused); "
              "null: the distinct labels of the training split (1 and 1.0 are one)")
    prompt_column: str = knob("prompt", "causal LMs: the prompt")
    response_column: str = knob("response", "causal LMs: the response (what the loss covers)")
    prompt_template: Optional[str] = knob(None, "causal LMs: builds the prompt from a row (str.format over its columns)")
    messages_column: str = knob("messages", "causal LMs: chat messages ([{role, content}, ...]) instead of prompt/response")
    chat_template: str = knob(
        "auto", "causal LMs: render rows with the tokenizer's chat template, the loss on assistant "
                "turns only; auto: when the tokenizer has one; true: required; false: plain text",
        check=lambda v: v.lower() in ("auto", "true", "false"), accepted="one of auto, true, false")
    train_split: str = knob("train", "the source's training split")
    eval_split: Optional[str] = knob(None, "a split of the source for evaluation; null: eval_size rows held out of train")
    eval_size: int = knob(256, "rows held out for evaluation", **positive())
    train_size: Optional[int] = knob(None, "synthetic: rows generated; others: a cap (null = all)", **optional_positive())
    max_length: int = knob(128, "tokens per row (longer rows are cut)", **positive())
    packing: bool = knob(False, "causal LMs: concatenate rows into blocks of max_length (no padding); "
                                "prompts stay masked; attention spans row boundaries")
    batching: Batching = knob(
        Batching.auto, "how rows make a batch: padded, padding_free (no compute on padding; "
                       "decoder models), grouped (similar lengths together), auto (padding_free "
                       "where exact for the model, else padded)")


def _strategy(strategy: Strategy):
    return knob(strategy, "which modules get adapters: set by selection=<strategy>")


def _top_frac(help: str = "fraction of layers kept per module type"):
    return knob(0.25, help, check=lambda v: 0 < v <= 1, accepted="a fraction in (0, 1]")


@dataclass
class SelectionConfig:
    """What every strategy takes. Each strategy (selection=<strategy>) has a schema of its own with
    the keys it reads, below; a key the chosen strategy does not read is refused while composing."""

    # A strategy = its schema here (in SELECTIONS), its function in spectrum/selection.py
    # (STRATEGIES) and conf/selection/<name>.yaml.

    strategy: Strategy = knob(Strategy.spectrum, "which modules get adapters: set by selection=<strategy>")
    module_types: Optional[List[str]] = knob(
        None, "candidate module types (exact suffix after the layer index); null: every 2-D weight "
              "inside the transformer blocks")

    def errors(self):
        """`key=value ...` for each combination of this strategy's keys it cannot train as typed."""
        return iter(())


@dataclass
class FromLayerSelection(SelectionConfig):
    min_layer: Optional[int] = knob(None, "candidates from this layer up only (backward then stops "
                                          "there: cheaper steps)",
                                    check=lambda v: v is None or v >= 0, accepted="a layer index (0 or more) or null")


@dataclass
class SpectrumSelection(FromLayerSelection):
    """Per module type, the top_frac of its layers with the highest SNR."""

    top_frac: float = _top_frac()
    min_per_type: int = knob(1, "at least this many modules per type (0: Spectrum's exact floor "
                                "rule, which keeps none of a type when count x top_frac < 1)",
                             check=lambda v: v >= 0, accepted="a non-negative integer")


@dataclass
class SpectrumGlobalSelection(SpectrumSelection):
    """One SNR ranking across every type; then the best of each type up to min_per_type."""

    strategy: Strategy = _strategy(Strategy.spectrum_global)


@dataclass
class KappaPerTypeSelection(SpectrumSelection):
    """Per module type, the lowest condition numbers."""

    strategy: Strategy = _strategy(Strategy.kappa_per_type)


@dataclass
class RandomSelection(SpectrumSelection):
    """The control: per type, as many modules as spectrum keeps, drawn with the run's seed."""

    strategy: Strategy = _strategy(Strategy.random)


@dataclass
class AlphaSelection(SpectrumSelection):
    """Per module type, ranked by the heavy-tail exponent (WeightWatcher's alpha)."""

    strategy: Strategy = _strategy(Strategy.alpha)
    alpha_order: AlphaOrder = knob(AlphaOrder.high_first,
                                   "high_first (AlphaLoRA: the least heavy-tailed, least-trained "
                                   "layers) or low_first (the most heavy-tailed)")


@dataclass
class SnrCutoffSelection(FromLayerSelection):
    """Every candidate whose SNR reaches snr_cutoff."""

    strategy: Strategy = _strategy(Strategy.snr_cutoff)
    snr_cutoff: float = knob(1.0, "every module with SNR >= this")


@dataclass
class KappaSelection(FromLayerSelection):
    """KappaTune, as peft ranks: the lowest condition numbers, one ranking across types."""

    strategy: Strategy = _strategy(Strategy.kappa)
    top_frac: float = _top_frac("max(1, int(count x top_frac)) of all candidates")
    num_modules: Optional[int] = knob(None, "exactly this many modules instead of top_frac",
                                      **optional_positive())

    def errors(self):
        if self.num_modules is not None and self.top_frac != _default(KappaSelection, "top_frac"):
            yield (f"selection.top_frac={self.top_frac} is read by selection=kappa without num_modules "
                   f"only, not selection=kappa with num_modules={self.num_modules}: drop it")


@dataclass
class LayersSelection(SelectionConfig):
    """Every candidate of the given layers, of the last k, or of the last top_frac of them."""

    strategy: Strategy = _strategy(Strategy.layers)
    layers: Optional[List[int]] = knob(None, "these layer indices (negative counts from the end)")
    last_k: Optional[int] = knob(None, "the last k layers (neither: the last top_frac of them)",
                                 **optional_positive())
    top_frac: float = _top_frac("with neither layers nor last_k: the last floor(n x top_frac) layers")

    def errors(self):
        if self.layers is not None and self.last_k is not None:
            yield (f"selection.layers={self.layers} and selection.last_k={self.last_k}: give one of them, "
                   f"not both")
        if self.layers is not None and not self.layers:
            yield "selection.layers=[] names no layer: give layer indices, or null"
        if (self.layers is not None or self.last_k is not None) and \
                self.top_frac != _default(LayersSelection, "top_frac"):
            yield (f"selection.top_frac={self.top_frac} is read by selection=layers without layers or last_k "
                   f"only, not with {'layers' if self.layers is not None else 'last_k'}: drop it")


@dataclass
class AllSelection(FromLayerSelection):
    """Plain QLoRA: every candidate."""

    strategy: Strategy = _strategy(Strategy.all)


@dataclass
class NoneSelection(SelectionConfig):
    """No adapters: only model.head_modules train (the linear-probe baseline)."""

    strategy: Strategy = _strategy(Strategy.none)


SELECTIONS = {schema.strategy: schema for schema in (
    SpectrumSelection, SpectrumGlobalSelection, SnrCutoffSelection, KappaSelection, KappaPerTypeSelection,
    AlphaSelection, RandomSelection, LayersSelection, AllSelection, NoneSelection)}


def selection_config(strategy: Strategy = Strategy.spectrum, **keys) -> SelectionConfig:
    """The schema of `strategy` with these keys (tests, scripts)."""
    return SELECTIONS[strategy](**keys)


def _default(schema, name: str):
    return schema.__dataclass_fields__[name].default


@dataclass
class LoraConfig:
    r: int = knob(8, "LoRA rank", **positive())
    alpha: int = knob(16, "LoRA alpha (the update is scaled by alpha / r)", **positive())
    dropout: float = knob(0.05, "dropout on the adapters' input", check=lambda v: 0 <= v < 1,
                          accepted="a probability in [0, 1)")
    bias: Bias = knob(Bias.none, "which biases train (peft's LoraConfig.bias)")
    use_rslora: bool = knob(False, "rank-stabilized scaling alpha / sqrt(r)")
    rank_allocation: RankAllocation = knob(RankAllocation.uniform,
                                           "uniform: every module gets r; snr: ranks grow with SNR within a type")
    r_min: int = knob(2, "rank_allocation=snr: the lowest rank", **positive())
    r_max: int = knob(64, "rank_allocation=snr: the highest rank")


@dataclass
class QuantConfig:
    mode: Quant = knob(Quant.nf4, "nf4, fp4 (4-bit), int8, or none")
    double_quant: bool = knob(True, "4-bit: quantize the quantization constants too")
    compute_dtype: Optional[str] = knob(None, "null: model.dtype (bf16 compute is slow on CPUs)", **_dtype(null=True))
    storage_dtype: Optional[str] = knob(
        None, "what packed 4-bit weights are stored as; null: uint8, or the compute dtype under "
              "FSDP (it shards float tensors only, all of one dtype)", **_dtype(null=True, extra=("uint8",)))


@dataclass
class ScanConfig:
    device: str = knob("cpu", "where the SVDs run: cpu, cuda, cuda:N",
                       check=lambda v: re.fullmatch(r"cpu|cuda(:\d+)?", v) is not None, accepted="cpu, cuda or cuda:N")
    cache: bool = knob(True, "reuse the SNR table of a checkpoint scanned before")
    cache_dir: str = knob("${cache_dir:}/scan", "where scanned tables are kept")


@dataclass
class TrainerConfig:
    """Knobs named as in transformers.TrainingArguments, passed to it unchanged; then
    spectraqlora's own (resume and below)."""

    max_steps: int = knob(-1, "optimizer steps; -1: num_train_epochs",
                          check=lambda v: v == -1 or v > 0, accepted="a positive integer, or -1 for epochs")
    num_train_epochs: float = knob(1.0, "epochs when max_steps=-1", **positive("number"))
    learning_rate: float = knob(2e-4, "QLoRA paper: 2e-4 for 7-13B, 1e-4 for 33-70B", **positive("number"))
    lr_scheduler_type: str = knob("linear", "a transformers scheduler name", check=lambda v: v in SCHEDULERS,
                                  accepted=f"one of transformers' schedulers: {', '.join(SCHEDULERS)}")
    warmup_steps: float = knob(10.0, "steps of linear warm-up", check=lambda v: v >= 0, accepted="a non-negative number")
    weight_decay: float = knob(0.0, "AdamW weight decay", check=lambda v: v >= 0, accepted="a non-negative number")
    max_grad_norm: float = knob(1.0, "gradient clipping (0: off)", check=lambda v: v >= 0,
                                accepted="a non-negative number (0: no clipping)")
    per_device_train_batch_size: int = knob(16, "rows per step per process", **positive())
    per_device_eval_batch_size: int = knob(64, "rows per evaluation batch", **positive())
    gradient_accumulation_steps: int = knob(1, "micro-batches per optimizer step", **positive())
    gradient_checkpointing: bool = knob(
        False, "non-reentrant activation checkpointing, set up by spectraqlora (run/modeling.py), never "
               "with input gradients: backward still stops at the lowest adapted layer")
    optim: Optional[str] = knob(None, "null: paged_adamw_8bit on CUDA, adamw_torch elsewhere; paged_* fall back on CPU",
                                check=lambda v: v is None or v in OPTIMIZERS,
                                accepted=f"null or one of {', '.join(OPTIMIZERS)}")
    logging_steps: int = knob(10, "steps between logged metrics", **positive())
    eval_steps: int = knob(50, "steps between evaluations (0: none during training)",
                           check=lambda v: v >= 0, accepted="a non-negative integer (0: no eval during training)")
    save_steps: int = knob(50, "steps between checkpoints (adapter + optimizer) to resume from (0: none)",
                           check=lambda v: v >= 0, accepted="a non-negative integer (0: no checkpoints)")
    save_total_limit: int = knob(2, "checkpoints kept", **positive())
    bf16: Optional[bool] = knob(None, "null: on where CUDA supports bf16")
    dataloader_num_workers: int = knob(0, "data loader processes (0: in the training process)",
                                       check=lambda v: v >= 0, accepted="a non-negative integer")
    resume: bool = knob(False, "continue from the last checkpoint in hydra.run.dir")
    on_nonfinite_loss: NonFinite = knob(NonFinite.error, "error: stop the run; skip: drop that step and count it")
    keep_checkpoints: bool = knob(False, "keep checkpoints/ once the run has finished")
    eval_before: bool = knob(True, "evaluate before training too (metrics.json's *_before)")
    eval_rows: Optional[int] = knob(None, "evaluations read the first N of the eval split's rows (null: all of "
                                          "them); the split itself, and so the training rows, stay as "
                                          "dataset.eval_size makes them", **optional_positive())


@dataclass
class LoggerConfig:
    name: Logger = knob(Logger.none, "none, or wandb (Weights & Biases)")
    project: Optional[str] = knob(None, "W&B project (null: $WANDB_PROJECT)")
    entity: Optional[str] = knob(None, "W&B entity (null: $WANDB_ENTITY)")
    progress: bool = knob(True, "progress bars on a terminal")


def show_progress(logger: LoggerConfig) -> bool:
    """Progress bars on a terminal unless logger.progress=false; never in captured output."""
    return logger.progress and sys.stderr.isatty()


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    selection: SelectionConfig = MISSING  # the schema of the strategy selection=<name> picks (SELECTIONS)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    seed: int = knob(42, "seeds data order, initialisation and dropout (python, numpy, torch)",
                     check=lambda v: 0 <= v < 2 ** 32, accepted="an integer in [0, 2^32), as numpy's seeds")


def range_errors(node, prefix: str = ""):
    """`key=value is out of range: expected ...` for every field whose check fails, in field order."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from range_errors(value, f"{prefix}{f.name}.")
        elif "check" in f.metadata and not f.metadata["check"][0](value):
            yield f"{prefix}{f.name}={value} is out of range: expected {f.metadata['check'][1]}"


def validate(cfg: TrainConfig) -> TrainConfig:
    """Refuse out-of-range values, naming the key and what it accepts, then combinations that
    would train something other than what was typed."""
    if error := next(range_errors(cfg), None):
        raise UserError(error)
    snr_ranks = cfg.lora.rank_allocation is RankAllocation.snr
    if snr_ranks and not cfg.lora.r_min <= cfg.lora.r <= cfg.lora.r_max:
        raise UserError(f"lora.r_min={cfg.lora.r_min}, lora.r={cfg.lora.r}, lora.r_max="
                        f"{cfg.lora.r_max}: expected r_min <= r <= r_max")
    if error := next(unread_keys(cfg), None):
        raise UserError(error)
    if type(cfg.selection) is not SELECTIONS[cfg.selection.strategy]:
        raise UserError(f"selection.strategy={cfg.selection.strategy.value} with the keys of another strategy: "
                        f"choose the strategy with selection={cfg.selection.strategy.value} (it brings its own keys)")
    if error := next(cfg.selection.errors(), None):
        raise UserError(error)
    if cfg.dataset.label_names is not None and cfg.model.task is not Task.classification:
        raise UserError(f"dataset.label_names is for classification; model.task={cfg.model.task.value} "
                        f"learns the response text")
    if cfg.selection.strategy is Strategy.none and not cfg.model.head_modules and \
            cfg.model.task is not Task.classification:
        raise UserError("selection=none trains only the classification head (model.head_modules), "
                        f"and model.task={cfg.model.task.value} has none")
    if cfg.dataset.packing and cfg.model.task is not Task.causal_lm:
        raise UserError(f"dataset.packing=true needs a causal LM; model.task={cfg.model.task.value}")
    if cfg.dataset.packing and cfg.dataset.batching not in (Batching.auto, Batching.padded):
        raise UserError(f"dataset.packing=true cuts rows into equal blocks, which dataset.batching="
                        f"{cfg.dataset.batching.value} would not batch as blocks: drop one of them")
    if cfg.dataset.batching is Batching.padding_free and cfg.model.task is Task.seq2seq:
        raise UserError("dataset.batching=padding_free is for decoder models (causal_lm, classification); "
                        "model.task=seq2seq: use dataset.batching=grouped or padded")
    if cfg.model.random_init is not None and cfg.model.gguf_file:
        raise UserError("model.random_init and model.gguf_file: give one of them, not both")
    if cfg.model.random_init is not None and not cfg.model.tokenizer:
        raise UserError("model.random_init needs model.tokenizer (where its tokenizer comes from)")
    return cfg


# key -> (read by this config?, who reads it, what to type instead). A key set to anything but its
# schema default where nothing reads it would be saved and ignored: the run would train
# something other than what was typed. (A selection key the strategy does not read is not in its
# schema: Hydra refuses it while composing.)
_READ_BY = {
    "lora.r_min": (lambda c: c.lora.rank_allocation is RankAllocation.snr, "lora.rank_allocation=snr",
                   "add lora.rank_allocation=snr"),
    "lora.r_max": (lambda c: c.lora.rank_allocation is RankAllocation.snr, "lora.rank_allocation=snr",
                   "add lora.rank_allocation=snr"),
}


def unread_keys(cfg: TrainConfig):
    """`key=value is read by ... only` for each key of _READ_BY set away from its default where
    this config does not read it."""
    for key, (read, readers, fix) in _READ_BY.items():
        group, name = key.split(".")
        node = getattr(cfg, group)
        value = getattr(node, name)
        if not read(cfg) and value != node.__dataclass_fields__[name].default:
            now = f"lora.rank_allocation={cfg.lora.rank_allocation.value}"
            shown = value.value if isinstance(value, enum.Enum) else value
            yield f"{key}={shown} is read by {readers} only, not {now}: {fix}"


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
            near = nearest(key, list(hints), _ALIASES)
            found.append((prefix + key, prefix + near if near else ""))
        elif dataclasses.is_dataclass(hints[key]) and isinstance(node[key], DictConfig):
            found += unknown_keys(node[key], _node_schema(node[key], hints[key]), f"{prefix}{key}.")
    return found


def _node_schema(node: DictConfig, declared):
    """The schema a node is checked against: its own type (a strategy's schema, where the field
    names the base), or for a plain selection node, its strategy's."""
    typed = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(typed):
        return typed
    if declared is SelectionConfig:
        return SELECTIONS[Strategy(node.get("strategy", Strategy.spectrum.value))]
    return declared


def read_by_another_strategy(name: str, strategy: Strategy, value=None) -> str | None:
    """`selection.<name>=<value> is read by selection=A, B only, not selection=<strategy>: ...` where
    the key is another strategy's, else None."""
    readers = [s.value for s, schema in SELECTIONS.items() if name in schema.__dataclass_fields__]
    if not readers or strategy.value in readers:
        return None
    fix = f"add selection={readers[0]}" if len(readers) == 1 else "drop it"
    return (f"selection.{name}{'' if value is None else f'={value}'} is read by selection={', '.join(readers)} "
            f"only, not selection={strategy.value}: {fix}")


# what each selection key held before each strategy had its own schema, where its strategy did
# not read it (the values a run's record then carried for every strategy)
_FORMER_DEFAULTS = {"top_frac": (0.25, 1.0), "min_per_type": (1,), "snr_cutoff": (0.0,), "layers": (None,),
                    "last_k": (None,), "alpha_order": ("high_first",), "num_modules": (None,), "min_layer": (None,)}


def _typed_selection(cfg: DictConfig) -> DictConfig:
    """A config whose selection is plain (a run's record: .hydra/config.yaml) under the schema of
    its strategy. Records written before each strategy had its own schema hold every strategy's
    keys: a key its strategy does not read is dropped where it holds its former default (a run
    could not set it otherwise), else refused."""
    node = cfg.get("selection")
    if not isinstance(node, DictConfig) or dataclasses.is_dataclass(OmegaConf.get_type(node)):
        return cfg
    schema = _node_schema(node, SelectionConfig)
    # the strategy's keys, and any other that is unknown or away from its former default (refused below)
    kept = {key: value for key, value in node.items()
            if key in schema.__dataclass_fields__ or value not in _FORMER_DEFAULTS.get(key, (value,))}
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.selection = OmegaConf.merge(OmegaConf.structured(schema), kept) if kept.keys() <= \
            schema.__dataclass_fields__.keys() else OmegaConf.create(kept)
    return cfg


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """The composed Hydra config as typed, resolved, validated dataclasses."""
    try:
        cfg = _typed_selection(cfg)
    except ValueError as exc:  # a strategy no schema has
        raise UserError(f"selection.strategy: {exc}") from None
    if unknown := unknown_keys(cfg):
        key, near = unknown[0]
        group, _, name = key.rpartition(".")
        if group == "selection" and (other := read_by_another_strategy(
                name, Strategy(cfg.selection.get("strategy", "spectrum")), cfg.selection[name])):
            raise UserError(other)
        schema = _node_schema(OmegaConf.select(cfg, group), _schema_at(group)) if group else TrainConfig
        known = [f.name for f in dataclasses.fields(schema)]
        raise UserError(f"unknown key {key}" + (f": did you mean {near}?" if near else "")
                        + f" (the keys of {group or 'the top level'} are: {', '.join(known)})")
    try:
        if missing := sorted(OmegaConf.missing_keys(cfg)):  # resolves interpolations: our resolvers may refuse
            raise UserError(f"{missing[0]} is not set: {_ASK.get(missing[0], f'give {missing[0]}=<value>')}")
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))
    except UserError:
        raise
    except Exception as exc:  # omegaconf's errors carry the key; keep their first line
        cause = exc
        while cause is not None and not isinstance(cause, UserError):  # one of our resolvers'
            cause = cause.__cause__ or cause.__context__
        raise (cause or UserError(str(exc).splitlines()[0])) from None
    return validate(typed)


_ASK = {"dataset.path": "which file? give dataset.path=<data.jsonl, .json, .csv or .parquet> (or a hub dataset id)"}


def _schema_at(path: str, schema=None):
    schema = schema or TrainConfig
    for part in filter(None, path.split(".")):
        schema = typing.get_type_hints(schema)[part]
    return schema


# keys a resumed run may give other values than its record: where and how it logs, checkpoints
# and scans, none of what it trains or on what
MAY_CHANGE_ON_RESUME = ("logger.", "scan.", "trainer.resume", "trainer.save_steps", "trainer.save_total_limit",
                        "trainer.keep_checkpoints", "trainer.logging_steps", "trainer.dataloader_num_workers",
                        "trainer.on_nonfinite_loss", "trainer.per_device_eval_batch_size",
                        "model.hub_id", "model.license")


def resume_differences(recorded: TrainConfig, typed: TrainConfig) -> list[str]:
    """`key: recorded -> typed` for each key a resumed run would change that it may not."""
    def flat(cfg) -> dict:
        tree = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
        out = {}

        def walk(node, prefix):
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                else:
                    out[f"{prefix}{key}"] = value
        walk(tree, "")
        return out

    before, after = flat(recorded), flat(typed)
    return [f"{key}: {before.get(key)} -> {after.get(key)}" for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key) and not key.startswith(MAY_CHANGE_ON_RESUME)]


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


EXPORT_BASES = ("dequantized", "original")


@dataclass
class ExportConfig:
    """python -m spectraqlora.export: a finished run as a standalone checkpoint, checked against it."""

    run_dir: Optional[str] = knob(None, "a finished run dir of python -m spectraqlora.train (it has metrics.json)")
    out: Optional[str] = knob(None, "where the export goes; null: <run_dir>/merged (adapter_only: <run_dir>/adapter_export)")
    dtype: Optional[str] = knob(None, "dtype of the merged weights; null: the run's model.dtype", **_dtype(null=True))
    base: str = knob(EXPORT_BASES[0], "dequantized: the 4-bit weights training saw; original: the full-precision "
                                      "checkpoint", check=lambda v: v in EXPORT_BASES,
                     accepted=f"one of {', '.join(EXPORT_BASES)}")
    adapter_only: bool = knob(False, "copy the adapter (with a model card) instead of merging")
    check_rows: int = knob(8, "eval rows the merged model's logits are compared on", **positive())
    loss_rows: Optional[int] = knob(64, "eval rows its loss is compared on, against the adapter on the 4-bit base "
                                        "(null: the whole eval split, against the run's eval loss)",
                                    **optional_positive())
    allow_pickle: bool = knob(False, "load an adapter_model.bin (pickle can run code)")


@dataclass
class EvaluateConfig:
    """python -m spectraqlora.evaluate: a finished run's base and adapter reloaded and evaluated again."""

    run_dir: Optional[str] = knob(None, "a finished run dir of python -m spectraqlora.train (it has metrics.json)")
    allow_pickle: bool = knob(False, "load an adapter_model.bin (pickle can run code)")
    force: bool = knob(False, "evaluate even when the rows differ from those the run recorded (row counts and "
                              "the eval rows' sha256), with a warning")


RUN_DIR_ALIASES = {"output": "out", "output_dir": "out", "dir": "run_dir"}  # keys export's and evaluate's users try


def checked(options):
    """A command's options (ExportConfig, EvaluateConfig) with each range check applied: the first
    failure is one UserError naming the key."""
    if error := next(range_errors(options), None):
        raise UserError(error)
    return options


resolvers.register()
ConfigStore.instance().store(name="train_schema", node=TrainConfig)
for _strategy_name, _schema in SELECTIONS.items():  # conf/selection/<name>.yaml: defaults [schema/<name>@_here_]
    ConfigStore.instance().store(group="selection/schema", name=_strategy_name.value, node=_schema)
ConfigStore.instance().store(name="export_schema", node=ExportConfig)
ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)

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
