"""The load sequence every entrypoint shares (train, evaluate, export, the benchmarks): the
checkpoint, tokenizer and rows first, then the 4-bit base with its adapters: new ones on the
selected modules, or a finished run's, reloaded."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from spectraqlora.config import TrainConfig
from spectraqlora.data import dataset, scoring
from spectraqlora.run import modeling
from spectraqlora.spectrum.selection import Selection
from spectraqlora.store import checkpoint

log = logging.getLogger("spectraqlora.data.dataset")


@dataclass
class Inputs:
    """What a run loads before any model: the checkpoint dir and its safetensors files, the
    tokenizer, and the rows as loaded (`raw`)."""

    path: Path
    files: list[Path]
    tokenizer: Any
    raw: Any  # datasets.DatasetDict

    def tokenized(self, cfg: TrainConfig, splits: tuple[str, ...] = ("train", "eval")):
        """The rows as the model reads them (evaluate: the eval split only; trainer.eval_rows of
        it), and for labeled data that a causal LM learns as text, the class names to score
        (scoring.LabelChoices), else None."""
        task, raw = cfg.model.task, self.raw
        if cfg.trainer.eval_rows is not None and cfg.trainer.eval_rows < len(raw["eval"]):
            log.info("data: evaluations read %d of the %d eval rows (trainer.eval_rows)", cfg.trainer.eval_rows,
                     len(raw["eval"]))
            raw = DatasetDict({**raw, "eval": raw["eval"].select(range(cfg.trainer.eval_rows))})
        return (dataset.tokenize(raw, self.tokenizer, cfg.dataset, task, splits),
                scoring.label_choices(raw, self.tokenizer, cfg.dataset, task))


def load_inputs(cfg: TrainConfig) -> Inputs:
    """The checkpoint (found, fetched, built or converted), its tokenizer and the dataset: a
    missing model or a dataset without the named column fails here, before anything heavy."""
    path = checkpoint.resolve(cfg.model)
    modeling.check_quant_support(cfg.quant)
    files = checkpoint.safetensors_files(path)
    checkpoint.check_dir(path, cfg.model, files)
    modeling.check_task(path, cfg.model)
    return Inputs(path, files, modeling.load_tokenizer(path, cfg.model), dataset.load(cfg.dataset, cfg.model.task, cfg.seed))


def base_model(inputs: Inputs, cfg: TrainConfig, fsdp: bool = False):
    """The frozen base, quantized as cfg.quant says (with a new head for classification)."""
    return modeling.load_base(inputs.path, cfg.model, cfg.quant, inputs.tokenizer,
                              dataset.num_labels(inputs.raw, cfg.dataset, cfg.model.task), fsdp)


def new_model(inputs: Inputs, cfg: TrainConfig, selection: Selection, fsdp: bool = False):
    """The base with new LoRA adapters on exactly the selected modules (their SNR ranks when
    given), heads trained whole; checkpointed as cfg.trainer says. Also the adapted modules'
    names in the loaded model."""
    base = base_model(inputs, cfg, fsdp)
    targets = modeling.model_names(base, selection.chosen)
    ranks = {t: selection.ranks[n] for t, n in zip(targets, selection.chosen)} if selection.ranks else None
    net = modeling.add_lora(base, targets, cfg.lora, cfg.model, ranks)
    if cfg.trainer.gradient_checkpointing:
        modeling.enable_checkpointing(net)
    return net, targets


def trained_model(inputs: Inputs, cfg: TrainConfig, adapter: Path, allow_pickle: bool = False):
    """The base with a finished run's adapter loaded (frozen)."""
    return modeling.load_adapter(base_model(inputs, cfg), adapter, allow_pickle)
