"""How tokenized rows become batches (dataset.batching), so that no step computes on padding.

- `padded`: each batch padded to its longest row (transformers' padding collators).
- `padding_free`: a batch's rows concatenated into one sequence of shape (1, total tokens) by
  transformers' DataCollatorWithFlattening, position ids restarting at each row. transformers
  builds per-row attention from restarting position ids (masking_utils for sdpa and eager,
  the varlen route for flash attention), so no row sees another; a classifier's rows are pooled
  at each row's last token (losses.py).
- `grouped`: rows of similar length batched together, in shuffled groups (the Trainer's
  `group_by_length` sampler), for models whose attention cannot take flattened rows.
- `auto`: padding_free where it is exact for the model, else padded (said once in the log).
"""
from __future__ import annotations

import logging
import sys

from spectraqlora.config import Batching, Task
from spectraqlora.data import attention
from spectraqlora.data.chat import IGNORE_INDEX
from spectraqlora.errors import UserError

log = logging.getLogger(__name__)

# attention implementations that keep flattened rows apart (from their restarting position ids)
_PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", attention.ROWWISE)


def padding_free_blocker(hf_model, task: Task, packing: bool) -> str | None:
    """Why a padding-free batch would not be exact for this model, or None when it would be."""
    config = hf_model.config
    if packing:
        return "dataset.packing=true batches equal blocks"
    if task not in (Task.causal_lm, Task.classification) or config.is_encoder_decoder:
        return f"{type(hf_model).__name__} is not a decoder-only model"
    causal = [m.is_causal for m in hf_model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if not causal or not all(causal):
        return f"{type(hf_model).__name__} is not a decoder-only model (its attention is not causal)"
    if not hasattr(sys.modules[type(hf_model).__module__], "create_causal_mask"):
        return f"{type(hf_model).__name__} builds its attention mask without transformers' masking_utils"
    if config._attn_implementation not in _PACKED_ATTENTION:
        return f"attention implementation {config._attn_implementation} does not keep flattened rows apart"
    if task is Task.classification and not hasattr(hf_model, "score"):
        return f"{type(hf_model).__name__} has no decoder classification head (score) to pool per row"
    return None


def resolve(choice: Batching, hf_model, task: Task, packing: bool) -> Batching:
    """dataset.batching for this model: auto becomes padding_free where exact, else padded (one
    log line either way); padding_free asked for where it is not exact is refused."""
    blocker = padding_free_blocker(hf_model, task, packing)
    if choice is Batching.padding_free and blocker:
        raise UserError(f"dataset.batching=padding_free: {blocker}; use dataset.batching=grouped or padded")
    if choice is not Batching.auto:
        return choice
    chosen = Batching.padded if blocker else Batching.padding_free
    log.info("data: dataset.batching=auto -> %s%s", chosen.value, f" ({blocker})" if blocker else
             " (rows concatenated per batch, attention kept inside each row)")
    return chosen


def attend_per_row(hf_model) -> None:
    """A padding-free model on sdpa attention: attention.ROWWISE instead (each row on its own
    rather than the whole batch under a block-diagonal mask; the same result)."""
    if hf_model.config._attn_implementation == "sdpa":
        attention.register()
        hf_model.set_attn_implementation(attention.ROWWISE)


class PaddingFree:
    """A batch's rows as one sequence: `input_ids` and `position_ids` of shape (1, tokens), the
    rows' boundaries (`cu_seq_lens_q`/`_k`, `max_length_q`/`_k`);
    causal LMs' `labels` flattened alike (each row's first label masked, so no row learns to
    predict the next row), a classifier's `labels` one per row. `attention_mask` (all ones) is
    there for the Trainer's count of tokens seen only: losses.py drops it before the model,
    which would otherwise take it for one unbroken row."""

    def __init__(self, task: Task):
        from transformers import DataCollatorWithFlattening

        self.task = task
        # the rows' boundaries go with the batch: flash attention's varlen route and sdpa_rows read them
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                                  return_flash_attn_kwargs=True)

    def __call__(self, features: list[dict]) -> dict:
        import torch

        if self.task is Task.classification:
            batch = self.flatten([{"input_ids": f["input_ids"]} for f in features])
            batch["labels"] = torch.tensor([f["labels"] for f in features])
        else:
            batch = self.flatten([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch


def collator(tokenizer, task: Task, batching: Batching = Batching.padded):
    """The collator for `batching` (auto resolved already: see `resolve`)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if batching is Batching.padding_free:
        return PaddingFree(task)
    if task is Task.classification:
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)


def longest_first(rows):
    """Rows ordered by length, longest first (ties in their order): evaluation batches then hold
    rows of similar length, so they pad little, and the largest batch comes first. Per-row
    results do not depend on the order."""
    lengths = [len(ids) for ids in rows["input_ids"]]
    return rows.select(sorted(range(len(lengths)), key=lambda i: -lengths[i]))
