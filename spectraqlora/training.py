"""transformers.Trainer set-up, evaluation metrics and resource figures."""
from __future__ import annotations

import dataclasses
import gc
import inspect
import logging
import math
import os
import resource
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import TrainingArguments

from spectraqlora import data, rundir
from spectraqlora.config import TrainConfig, Task
from spectraqlora.errors import NonFiniteLoss

log = logging.getLogger(__name__)


def training_arguments(cfg: TrainConfig, run_dir: Path) -> TrainingArguments:
    knobs = dataclasses.asdict(cfg.trainer)
    bf16 = knobs.pop("bf16")
    if bf16 is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    eval_steps, save_steps = knobs.pop("eval_steps"), knobs.pop("save_steps")
    checkpointing = knobs.pop("gradient_checkpointing")
    for own in ("resume", "on_nonfinite_loss", "keep_checkpoints"):
        knobs.pop(own)
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing
    ac = "activation" if "activation_checkpointing" in inspect.signature(TrainingArguments).parameters else "gradient"
    return TrainingArguments(
        output_dir=str(run_dir / rundir.CHECKPOINTS),
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps or None,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        **{f"{ac}_checkpointing": checkpointing,
           f"{ac}_checkpointing_kwargs": {"use_reentrant": False} if checkpointing else None},
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=bf16,
        seed=cfg.seed,
        report_to=["wandb"] if cfg.logger.name == "wandb" else "none",
        disable_tqdm=not (cfg.logger.progress and sys.stderr.isatty()),
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=cfg.model.task is not Task.classification,
        **knobs,
    )


class Trainer(transformers.Trainer):
    """transformers' Trainer that never trains on a NaN or infinite loss.

    on_nonfinite_loss="error" stops the run with NonFiniteLoss; "skip" drops that micro-batch
    (no gradient from it) and counts it in `skipped_steps`.
    """

    def __init__(self, *args, on_nonfinite_loss: str = "error", **kwargs):
        super().__init__(*args, **kwargs)
        self.on_nonfinite_loss = on_nonfinite_loss
        self.skipped_steps = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if not model.training or torch.isfinite(loss.detach()).all():
            return result
        step = self.state.global_step + 1
        if self.on_nonfinite_loss == "error":
            raise NonFiniteLoss(
                f"the training loss became {loss.detach().float().mean().item()} at step {step} "
                f"(learning rate {self._get_learning_rate():.3g}); lower trainer.learning_rate, "
                f"or set trainer.on_nonfinite_loss=skip to drop such steps")
        self.skipped_steps += 1
        log.warning("non-finite training loss at step %d: step skipped (%d so far)",
                    step, self.skipped_steps)
        zero = torch.zeros((), device=loss.device, requires_grad=True)  # no gradient flows back
        return (zero, *result[1:]) if return_outputs else zero


def accuracy(eval_pred) -> dict:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def build_trainer(net, tokenized, tokenizer, cfg: TrainConfig, run_dir: Path) -> Trainer:
    if cfg.logger.name == "wandb":
        _wandb_env(cfg, run_dir)
    return Trainer(
        model=net,
        args=training_arguments(cfg, run_dir),
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["eval"],
        data_collator=data.collator(tokenizer, cfg.model.task),
        processing_class=tokenizer,
        compute_metrics=accuracy if cfg.model.task is Task.classification else None,
        on_nonfinite_loss=cfg.trainer.on_nonfinite_loss,
    )


def evaluate(trainer: Trainer, task: Task) -> dict:
    """eval_loss, plus eval_accuracy (classification) or eval_perplexity (language models)."""
    raw = trainer.evaluate()
    out = {"eval_loss": raw["eval_loss"]}
    if task is Task.classification:
        out["eval_accuracy"] = raw["eval_accuracy"]
    else:
        out["eval_perplexity"] = math.exp(min(raw["eval_loss"], 700.0))
    return out


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def release_accelerator_memory() -> None:
    """After a failed trial: give its cached GPU memory back before the next one starts."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_mem_gb() -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _wandb_env(cfg: TrainConfig, run_dir: Path) -> None:
    """Point the Trainer's W&B callback at the run dir; offline when no key is set up."""
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    if cfg.logger.project:
        os.environ["WANDB_PROJECT"] = cfg.logger.project
    if cfg.logger.entity:
        os.environ["WANDB_ENTITY"] = cfg.logger.entity
    has_key = os.environ.get("WANDB_API_KEY") or "api.wandb.ai" in _netrc()
    if not has_key and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        log.info("W&B: no API key, logging offline under %s (upload later: wandb sync)", run_dir)


def _netrc() -> str:
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return path.read_text() if path.is_file() else ""
