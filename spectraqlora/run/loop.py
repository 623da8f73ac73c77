"""transformers.Trainer set-up, evaluation metrics and resource figures."""
from __future__ import annotations

import dataclasses
import gc
import logging
import signal
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import TrainingArguments

from spectraqlora.config import Batching, NonFinite, Task, TrainConfig, show_progress
from spectraqlora.data import batching, scoring
from spectraqlora.errors import NonFiniteLoss
from spectraqlora.run import losses, metrics
from spectraqlora.run.telemetry import Telemetry
from spectraqlora.store import rundir

log = logging.getLogger(__name__)


def training_arguments(cfg: TrainConfig, run_dir: Path, fsdp: bool = False,
                       grouped: bool = False) -> TrainingArguments:
    knobs = dataclasses.asdict(cfg.trainer)
    bf16 = knobs.pop("bf16")
    if bf16 is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    eval_steps, save_steps = knobs.pop("eval_steps"), knobs.pop("save_steps")
    # spectraqlora's own knobs; checkpointing is set up on the model (modeling.py), not by the
    # Trainer, which would turn on input gradients
    for own in ("gradient_checkpointing", "resume", "on_nonfinite_loss", "keep_checkpoints", "eval_before",
                "eval_rows"):
        knobs.pop(own)
    return TrainingArguments(
        output_dir=str(run_dir / rundir.CHECKPOINTS),
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps or None,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # and under accelerate launch / torchrun: gloo DDP
        bf16=bf16,
        seed=cfg.seed,
        report_to="none",  # W&B goes through spectraqlora.run.telemetry, with its own keys
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=not show_progress(cfg.logger),
        remove_unused_columns=False,
        label_names=["labels"],
        train_sampling_strategy="group_by_length" if grouped else "random",
        prediction_loss_only=cfg.model.task is not Task.classification,
        **{**knobs, "optim": optimizer(knobs["optim"], fsdp)},
    )


# Paged optimizers page their state out of GPU memory; without a GPU, the same optimizer unpaged.
_UNPAGED = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_torch"}


def optimizer(name: str | None, fsdp: bool = False) -> str:
    """trainer.optim for TrainingArguments: null picks paged 8-bit AdamW on CUDA, AdamW
    elsewhere and under FSDP (whose checkpoints paged 8-bit AdamW cannot save, as peft's FSDP
    guide says); a paged optimizer asked for on a machine without CUDA falls back (one line)."""
    cuda = torch.cuda.is_available()
    if name is None:
        return "paged_adamw_8bit" if cuda and not fsdp else "adamw_torch"
    if name in _UNPAGED and not cuda:
        log.info("trainer.optim=%s: no GPU to page from, using %s", name, _UNPAGED[name])
        return _UNPAGED[name]
    return name


class Trainer(transformers.Trainer):
    """transformers' Trainer that never trains on a NaN or infinite loss, and whose evaluations
    score a causal LM on labeled data like a classifier (`eval_accuracy`, from `choices`).

    on_nonfinite_loss="error" stops the run with NonFiniteLoss; "skip" drops that micro-batch
    (no gradient from it) and counts it in `skipped_steps`.
    """

    def __init__(self, *args, on_nonfinite_loss: NonFinite = NonFinite.error, choices: scoring.LabelChoices | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.on_nonfinite_loss = NonFinite(on_nonfinite_loss)
        self.skipped_steps = 0
        self.choices = choices

    def evaluation_loop(self, dataloader, *args, **kwargs):
        began = time.perf_counter()
        counter = self.compute_loss_func if isinstance(self.compute_loss_func, losses.LabelLoss) else None
        if counter is not None:
            counter.correct = counter.scored = 0
        out = super().evaluation_loop(dataloader, *args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        if self.choices is not None and counter is not None and counter.class_tokens is not None \
                and self.args.world_size == 1 and counter.scored == len(self.choices.gold):
            out.metrics[f"{prefix}_accuracy"] = counter.correct / counter.scored  # ranked in the loss pass
        elif self.choices is not None:
            # under FSDP only the wrapped model holds whole weights; every rank scores alike
            net = self.model_wrapped if self.is_fsdp_enabled else self.model
            with self.autocast_smart_context_manager():
                accuracy = scoring.choice_accuracy(net, self.choices, self.args.eval_batch_size,
                                           self.processing_class.pad_token_id, self.args.device)
            out.metrics[f"{prefix}_accuracy"] = accuracy
        tokens = sum(map(len, dataloader.dataset["input_ids"]))  # the eval rows' own tokens, no padding
        out.metrics[f"{prefix}_tokens_per_sec"] = tokens / (time.perf_counter() - began)
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if isinstance(self.compute_loss_func, losses.LabelLoss):
            inputs = self.compute_loss_func.model_inputs(inputs)
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if not model.training or torch.isfinite(loss.detach()).all():
            return result
        step = self.state.global_step + 1
        if self.on_nonfinite_loss is NonFinite.error:
            raise NonFiniteLoss(
                f"the training loss became {loss.detach().float().mean().item()} at step {step} "
                f"(learning rate {self._get_learning_rate():.3g}); lower trainer.learning_rate, "
                f"or set trainer.on_nonfinite_loss=skip to drop such steps")
        self.skipped_steps += 1
        log.warning("non-finite training loss at step %d: step skipped (%d so far)",
                    step, self.skipped_steps)
        zero = torch.zeros((), device=loss.device, requires_grad=True)  # no gradient flows back
        return (zero, *result[1:]) if return_outputs else zero


class StopOnSignal(transformers.TrainerCallback):
    """While installed (a `with` block around training): SIGINT (Ctrl-C) or SIGTERM lets the
    current step finish, saves a checkpoint and stops training; `signum` tells which came. A
    second signal stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s: stopping after this step and saving a checkpoint (send it again to stop "
                    "at once, without one)", signal.Signals(signum).name)

    def on_step_end(self, args, state, control, **kwargs):
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True


class PruningCallback(transformers.TrainerCallback):
    """Reports each eval loss to an Optuna trial (spectraqlora's sweeper) and stops the run when
    the study's pruner says so; the sweeper records the trial PRUNED with that last value."""

    def __init__(self, trial):
        self.trial = trial

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        import optuna

        if state.global_step == 0 or "eval_loss" not in (metrics or {}):
            return
        self.trial.report(metrics["eval_loss"], state.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"eval loss {metrics['eval_loss']:.6g} at step {state.global_step}")


def accuracy(eval_pred) -> dict:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


class TelemetryCallback(transformers.TrainerCallback):
    """The Trainer's logs under the logged names, plus throughput over each logging window
    (step times of training steps only, so evaluations in between do not count) and memory."""

    def __init__(self, telemetry: Telemetry, task: Task):
        self.telemetry, self.task = telemetry, task
        self.window: list[float] = []  # step times since the last train log
        self.steps: list[float] = []  # all step times of this process
        self.tokens_begin = self.tokens_window = 0
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens_begin = self.tokens_window = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.window.append(time.perf_counter() - self.started)
        self.steps.append(self.window[-1])

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        out = {new: logs[old] for old, new in metrics.TRAINER_KEYS.items() if old in logs}
        figures = {}
        if "eval_loss" in logs and self.task is not Task.classification:
            figures["eval_perplexity"] = metrics.perplexity(logs["eval_loss"])
        if "loss" in logs and self.window:
            figures.update(metrics.throughput(self.window, state.num_input_tokens_seen - self.tokens_window,
                                              _samples_per_step(args)),
                           train_tokens=state.num_input_tokens_seen)
            self.window, self.tokens_window = [], state.num_input_tokens_seen
        if out or figures:
            self.telemetry.log({**out, **metrics.logged({**figures, **metrics.memory()})}, state.global_step)

    def totals(self, args, state) -> dict:
        """Throughput over every training step this process ran (for metrics.json)."""
        if not self.steps:
            return {}
        return {**metrics.throughput(self.steps, state.num_input_tokens_seen - self.tokens_begin,
                                     _samples_per_step(args)),
                "train_tokens": state.num_input_tokens_seen}


def _samples_per_step(args: TrainingArguments) -> int:
    return args.train_batch_size * args.gradient_accumulation_steps * args.world_size


class LogProgress(transformers.TrainerCallback):
    """Without a progress bar (output piped to a file): one log line per logging step, with the
    time left (training steps to come at their measured pace, plus the evaluations to come at
    the last one's), and during an evaluation a line every tenth of its batches (once it has
    run QUIET_S seconds: short evaluations say nothing)."""

    QUIET_S = 5.0

    def __init__(self):
        self.train_s = 0.0  # time in training steps, evaluations excluded
        self.steps = 0
        self.eval_s: float | None = None  # the last evaluation's duration
        self.eval_batches = self.eval_total = 0
        self.started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_s += time.perf_counter() - self.started
        self.steps += 1

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        """The clock starts at the end of the first batch: the pace is that of the batches since."""
        now = time.perf_counter()
        if self.eval_batches == 0:
            self.eval_began = self.said = now
        self.eval_batches += 1
        self.eval_total = len(eval_dataloader) if eval_dataloader is not None else 0
        done, total = self.eval_batches, self.eval_total
        if total and done < total and done % -(-total // 10) == 0 and now - self.said >= self.QUIET_S:
            self.said = now
            log.info("evaluating: batch %d/%d, %s left", done, total, _clock(self._per_batch() * (total - done)))

    def _per_batch(self) -> float:
        return (time.perf_counter() - self.eval_began) / max(self.eval_batches - 1, 1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_batches:
            self.eval_s = self._per_batch() * max(self.eval_total, self.eval_batches)
        self.eval_batches = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "eval_loss" in logs and state.max_steps:
            log.info("step %d/%d: eval loss %.4f%s", state.global_step, state.max_steps, logs["eval_loss"],
                     f"  accuracy {logs['eval_accuracy']:.4f}" if "eval_accuracy" in logs else "")
        elif "loss" in logs and self.steps:
            per_step = self.train_s / self.steps
            evals = evaluations_left(args, state)
            left = per_step * (state.max_steps - state.global_step)
            if self.eval_s is not None:
                evals_note = f" (with {evals} evaluation{'s' * (evals != 1)})" if evals else ""
                left += evals * self.eval_s
            else:
                evals_note = f" (+ {evals} evaluation{'s' * (evals != 1)})" if evals else ""
            log.info("step %d/%d: loss %.4f  lr %.3g  %.2f s/step  %s left%s", state.global_step,
                     state.max_steps, logs["loss"], logs.get("learning_rate", float("nan")),
                     per_step, _clock(left), evals_note)


def evaluations_left(args: TrainingArguments, state) -> int:
    """Evaluations still to come: the Trainer's every eval_steps, then the one after training
    (training.evaluate reuses an evaluation of the last step)."""
    every = args.eval_steps if args.eval_strategy == "steps" else 0
    periodic = (state.max_steps // every - state.global_step // every) if every else 0
    final_reused = bool(every) and state.max_steps % every == 0
    return periodic + (0 if final_reused else 1)


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def build_trainer(net, tokenized, tokenizer, cfg: TrainConfig, run_dir: Path, callbacks: list | None = None,
                  choices: scoring.LabelChoices | None = None, fsdp: bool = False) -> Trainer:
    """The Trainer for this run: batches as dataset.batching says (auto resolved for this model),
    the loss computed where the labels are (losses.py)."""
    task, hf_model = cfg.model.task, scoring.hf_model(net)
    mode = batching.resolve(cfg.dataset.batching, hf_model, task, cfg.dataset.packing)
    if mode is Batching.padding_free:
        batching.attend_per_row(hf_model)
    loss = None if task is Task.seq2seq else losses.LabelLoss(task, hf_model, mode is Batching.padding_free)
    if loss is not None and choices is not None:
        tokens = scoring.single_token_classes(choices, len(tokenized["eval"]))
        loss.class_tokens = None if tokens is None else torch.tensor(tokens)
    trainer = Trainer(
        model=net,
        args=training_arguments(cfg, run_dir, fsdp, grouped=mode is Batching.grouped),
        train_dataset=tokenized.get("train"),  # None: evaluation only
        eval_dataset=tokenized["eval"],
        data_collator=batching.collator(tokenizer, task, mode),
        compute_loss_func=loss,
        processing_class=tokenizer,
        compute_metrics=accuracy if cfg.model.task is Task.classification else None,
        on_nonfinite_loss=cfg.trainer.on_nonfinite_loss,
        choices=choices,
        callbacks=callbacks,
    )
    if trainer.args.disable_tqdm:
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        trainer.add_callback(LogProgress())
    return trainer


def save_adapter(trainer: Trainer, path: Path) -> None:
    """The adapter as safetensors, written by the main process; under FSDP every rank takes
    part in gathering its shards."""
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(path))
    elif trainer.args.should_save:
        trainer.model.save_pretrained(path, safe_serialization=True)


def evaluate(trainer: Trainer, task: Task) -> dict:
    """eval_loss, plus eval_perplexity (language models), eval_accuracy (classification, and
    language models on labeled data) and eval_tokens_per_sec.

    An evaluation the Trainer has just run at this very step is reused, not repeated."""
    step = trainer.state.global_step
    done = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == step > 0]
    raw = done[-1] if done else trainer.evaluate()
    unmark_prepared(trainer)
    out = {"eval_loss": raw["eval_loss"]}
    if task is not Task.classification:
        out["eval_perplexity"] = metrics.perplexity(raw["eval_loss"])
    for key in ("eval_accuracy", "eval_tokens_per_sec"):
        if key in raw:
            out[key] = raw[key]
    return out


def unmark_prepared(trainer: Trainer) -> None:
    """Under DDP, an evaluation before training has accelerate prepare the model for evaluation,
    which marks it prepared: train() would then skip the DDP wrap, and each rank would train on
    its own (transformers 5.24 with accelerate 1.15; the DDP test catches it). Unmarked, train()
    wraps it. (FSDP's evaluation wraps the model for good: left alone.)"""
    model = trainer.model
    ddp_to_come = trainer.args.world_size > 1 and not trainer.is_fsdp_enabled and trainer.model_wrapped is model
    if ddp_to_come and getattr(model, "_is_accelerate_prepared", False):
        model._is_accelerate_prepared = False
        trainer.accelerator._models = [m for m in trainer.accelerator._models if m is not model]


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def release_accelerator_memory() -> None:
    """After a failed trial: give its cached GPU memory back before the next one starts."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
