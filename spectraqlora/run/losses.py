"""The training and evaluation loss computed only where it is defined, passed to the Trainer as
its `compute_loss_func` (the Trainer then scales it for gradient accumulation and devices as it
does a model's own loss).

- Causal LMs: the output layer runs only at positions whose next token is a target (the
  model's `logits_to_keep`), not at every prompt and padding position; the cross entropy is the
  model's own (sum over targets / the Trainer's count of them, else their mean).
- Classifiers on a padding-free batch (batching.py): the head's output is taken at each row's
  last token (the rightmost token that is not the pad token, as transformers' decoder
  classifiers pool a padded row), so each row gets its own logits.
- Causal LMs scored like classifiers (scoring.single_token_classes): in evaluation, the logits at
  each row's first answer position also rank the class names' tokens there, counted in
  `correct` / `scored`: the accuracy without a second pass over the prompts.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from spectraqlora.config import Task
from spectraqlora.data.chat import IGNORE_INDEX


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a target in some row of the batch (1-D)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)


def row_ends(input_ids: torch.Tensor, position_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """For a flattened batch (1, tokens) whose position ids restart at 0 for each row: the index
    of each row's rightmost token that is not `pad_id` (its first token if it has none)."""
    ids, positions = input_ids[0], position_ids[0]
    row = (positions == 0).cumsum(0) - 1
    index = torch.arange(len(ids), device=ids.device)
    real = index if pad_id is None else torch.where(ids != pad_id, index, -1)
    ends = torch.full((int(row[-1]) + 1,), -1, device=ids.device).scatter_reduce(0, row, real, "amax")
    starts = index[positions == 0]
    return torch.where(ends >= 0, ends, starts)


class LabelLoss:
    """`Trainer(compute_loss_func=...)`, with `model_inputs` applied to each batch before the model
    sees it (training.Trainer.compute_loss)."""

    def __init__(self, task: Task, hf_model, flattened: bool):
        self.task, self.flattened = task, flattened
        self.pad_id = hf_model.config.get_text_config().pad_token_id
        self.keep_logits = task is Task.causal_lm and "logits_to_keep" in inspect.signature(hf_model.forward).parameters
        self._head_out: torch.Tensor | None = None
        self._ends: torch.Tensor | None = None
        self.class_tokens: torch.Tensor | None = None  # set by training.build_trainer when they qualify
        self.correct = self.scored = 0
        if task is Task.classification and flattened:
            hf_model.score.register_forward_hook(self._keep_head_output)

    def _keep_head_output(self, module, args, output):
        self._head_out = output

    def model_inputs(self, inputs: dict) -> dict:
        """What the model is given: a flattened batch without its count-only attention mask and
        without a KV cache (transformers keeps flattened rows apart only when it has neither); for
        causal LMs, the positions to compute logits at."""
        if self.flattened:
            inputs = {**{k: v for k, v in inputs.items() if k != "attention_mask"}, "use_cache": False}
            if self.task is Task.classification:
                self._ends = row_ends(inputs["input_ids"], inputs["position_ids"], self.pad_id)
        if self.keep_logits:
            inputs = {**inputs, "logits_to_keep": target_positions(inputs["labels"])}
        return inputs

    def _count_choices(self, logits: torch.Tensor, before: torch.Tensor, targets: torch.Tensor) -> None:
        """Rows whose first answer token (a target after a non-target) is the class token the
        logits there rank highest among the class tokens."""
        first = (before == IGNORE_INDEX) & (targets != IGNORE_INDEX)
        tokens = self.class_tokens.to(logits.device)
        predicted = tokens[logits[first][:, tokens].argmax(-1)]
        self.correct += int((predicted == targets[first].to(logits.device)).sum())
        self.scored += int(first.sum())

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        if self.task is Task.causal_lm:
            keep = target_positions(labels)
            logits = outputs["logits"]
            if logits.shape[1] == labels.shape[1]:  # the model computed every position
                logits = logits[:, keep]
            targets = labels[:, keep + 1]
            if self.class_tokens is not None and not torch.is_grad_enabled():  # an evaluation
                self._count_choices(logits, labels[:, keep], targets)
        else:
            if self.flattened:
                outputs["logits"] = self._head_out[0, self._ends]  # one row of logits per row
                self._head_out = None
            logits, targets = outputs["logits"], labels
        loss = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten().to(logits.device),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
        return loss / (count.to(loss.device) if torch.is_tensor(count) else count)
