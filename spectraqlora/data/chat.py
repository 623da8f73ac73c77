"""Chat templates: rows rendered by the tokenizer's own template, the loss on assistant turns only."""
from __future__ import annotations

from spectraqlora.config import DatasetConfig, Task
from spectraqlora.errors import UserError

IGNORE_INDEX = -100


def chat_template_on(tokenizer, cfg: DatasetConfig, task: Task) -> bool:
    """Whether rows are rendered with the tokenizer's chat template (dataset.chat_template:
    auto = when the tokenizer has one; only causal LMs use it)."""
    setting = cfg.chat_template.lower()
    has_one = getattr(tokenizer, "chat_template", None) is not None
    if setting == "true" and not (task is Task.causal_lm and has_one):
        why = f"model.task={task.value} does not use one" if has_one else "the tokenizer has none"
        raise UserError(f"dataset.chat_template=true but {why}: set dataset.chat_template=auto or false")
    return task is Task.causal_lm and has_one and setting != "false"


# What a token of a rendered conversation is
PROMPT, REPLY, TEMPLATE = 0, 1, 2  # TEMPLATE: what the template adds to an assistant turn


def render_chat(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """A conversation as the tokenizer's chat template renders it, cut to max_length tokens: the
    token ids and what each one is (PROMPT; REPLY: an assistant message's own text; TEMPLATE:
    what the template adds to an assistant turn, such as its end-of-turn token).

    Each assistant turn is found by rendering the conversation up to it (with the generation
    prompt) and through it; turns past max_length are not rendered."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"][:max_length], encoded["offset_mapping"][:max_length]
    kept = offsets[-1][1] if offsets else 0  # characters left after truncation
    kinds = [PROMPT] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        if len(before) >= kept:
            break
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise UserError("the tokenizer's chat template renders an earlier turn differently once a "
                            "later one follows, so assistant tokens cannot be told apart: set "
                            "dataset.chat_template=false")
        start = through.find(message["content"], len(before))
        start, stop = (start, start + len(message["content"])) if start >= 0 else (len(before), len(through))
        for t, (s, _) in enumerate(offsets):
            if len(before) <= s < len(through):
                kinds[t] = REPLY if start <= s < stop else TEMPLATE
    return ids, kinds


def _labeled_chat(tokenizer, messages: list[dict], max_length: int) -> dict:
    ids, kinds = render_chat(tokenizer, messages, max_length)
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [IGNORE_INDEX if k == PROMPT else t for t, k in zip(ids, kinds)]}
