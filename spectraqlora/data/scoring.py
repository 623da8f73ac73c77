"""A causal LM scored on labeled data like a classifier: each class name's tokens after each
row's prompt (rendered as in training), the class with the highest log-probability its answer
(`eval_accuracy`)."""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from datasets import ClassLabel, DatasetDict

from spectraqlora.config import DatasetConfig, Task
from spectraqlora.data.chat import IGNORE_INDEX, REPLY, chat_template_on, render_chat
from spectraqlora.data.dataset import _messages, _prompt, _prompt_response
from spectraqlora.data.sources import answer
from spectraqlora.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class LabelChoices:
    """Eval rows of a labeled dataset, as a causal LM can be scored on them like a classifier:
    each row's answer is the class whose name the model gives the highest log-probability after
    the row's prompt (the name's tokens only, not what ends the turn)."""

    inputs: list[list[int]]  # distinct token sequences to run the model on
    # (row, class, input, position, token): log p(token) at that position of that input adds
    # to the score of that class for that row
    terms: list[tuple[int, int, int, int, int]]
    gold: list[int]  # each row's class
    names: list[str]


def label_choices(data: DatasetDict, tokenizer, cfg: DatasetConfig, task: Task) -> LabelChoices | None:
    """For causal LMs on a labeled dataset (a class-label column and prompts, as the built-in
    labeled datasets have): what scoring every class name on the eval rows takes. Rows where a
    class name does not fit in dataset.max_length are left out (logged). None otherwise."""
    rows = data["eval"]
    feature = rows.features.get(cfg.label_column)
    if task is not Task.causal_lm or not isinstance(feature, ClassLabel) or cfg.prompt_column not in rows.column_names:
        return None
    chat = chat_template_on(tokenizer, cfg, task)
    index: dict[tuple, int] = {}
    terms, gold = [], []
    for row in rows:
        parts = [_answer_tokens(tokenizer, row, cfg, name, chat) for name in feature.names]
        if any(len(prefix) + len(tokens) > cfg.max_length for prefix, tokens in parts):
            continue
        for c, (prefix, tokens) in enumerate(parts):
            i = index.setdefault(tuple(prefix + tokens[:-1]), len(index))
            terms += [(len(gold), c, i, len(prefix) - 1 + k, token) for k, token in enumerate(tokens)]
        gold.append(row[cfg.label_column])
    if not gold:
        raise UserError(f"dataset.max_length={cfg.max_length} leaves no eval row room for its "
                        f"class name: raise dataset.max_length")
    if len(gold) < len(rows):
        log.info("data: accuracy over %d of %d eval rows (the others do not fit every class name "
                 "in dataset.max_length=%d)", len(gold), len(rows), cfg.max_length)
    return LabelChoices([list(seq) for seq in index], terms, gold, list(feature.names))


def single_token_classes(choices: LabelChoices, eval_rows: int) -> list[int] | None:
    """The class names' token ids when the eval loss pass can rank the classes itself: every
    eval row scored, each class name one token (the same in every row, distinct between classes)
    right after a prompt its row's classes share. Then a row's first answer token is its class
    name's token, and the logits the loss pass computes there rank the classes as choice_scores
    would (a causal model's logits at a position do not depend on the tokens after it). None
    otherwise (choice_scores runs its own pass)."""
    if len(choices.gold) != eval_rows:
        return None
    per_row: dict[int, list[tuple[int, int, int, int]]] = {}
    for row, choice, i, position, token in choices.terms:
        per_row.setdefault(row, []).append((choice, i, position, token))
    tokens: dict[int, int] = {}
    for terms in per_row.values():
        if len(terms) != len(choices.names) or len({(i, position) for _, i, position, _ in terms}) != 1:
            return None
        for choice, _, _, token in terms:
            if tokens.setdefault(choice, token) != token:
                return None
    ids = [tokens[c] for c in range(len(choices.names))]
    return ids if len(set(ids)) == len(ids) else None


_WHOLE = 1 << 30  # a max_length that cuts nothing


def _answer_tokens(tokenizer, row: dict, cfg: DatasetConfig, name: str, chat: bool) -> tuple[list[int], list[int]]:
    """The tokens before the answer, and the answer's own tokens, when a row is answered with
    the class `name`, rendered as in training."""
    if chat:
        ids, kinds = render_chat(tokenizer, _messages(row, cfg, answer(name)), _WHOLE)
        first = kinds.index(REPLY)
        return ids[:first], [t for t, k in zip(ids, kinds) if k == REPLY]
    encoded = _prompt_response(tokenizer, _prompt(row, cfg), answer(name), _WHOLE, Task.causal_lm)
    first = next(i for i, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX)
    return encoded["input_ids"][:first], encoded["input_ids"][first:-1]  # without eos


def choice_accuracy(model, choices: LabelChoices, batch_size: int, pad_id: int, device) -> float:
    """The fraction of rows whose class name the model scores highest (LabelChoices)."""
    scores = choice_scores(model, choices, batch_size, pad_id, device)
    return float((scores.argmax(1) == torch.tensor(choices.gold)).double().mean())


@torch.no_grad()
def choice_scores(model, choices: LabelChoices, batch_size: int, pad_id: int, device) -> torch.Tensor:
    """rows x classes: the log-probability of each class name's tokens after each row's prompt.

    The scored positions of an input are its last ones, so inputs are padded on the left (with
    position ids that skip the padding) and, where the model allows, only the last positions'
    logits are computed: a vocabulary-wide projection per scored token, not per input token."""
    inputs = choices.inputs
    by_input: dict[int, list[tuple[int, int, int, int]]] = {}  # input -> (row, class, positions from its end, token)
    for row, choice, i, position, token in choices.terms:
        by_input.setdefault(i, []).append((row, choice, len(inputs[i]) - 1 - position, token))
    accepts = inspect.signature(hf_model(model).forward).parameters
    left = "position_ids" in accepts  # without them, left padding would shift absolute positions
    scores = torch.zeros(len(choices.gold), len(choices.names), dtype=torch.float64)
    was_training = model.training
    model.eval()
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))  # similar lengths, less padding
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(inputs[i]) for i in batch)
        pads = [[pad_id] * (width - len(inputs[i])) for i in batch]
        ids = torch.tensor([p + inputs[i] if left else inputs[i] + p for p, i in zip(pads, batch)], device=device)
        mask = torch.tensor([[0] * len(p) + [1] * len(inputs[i]) if left else [1] * len(inputs[i]) + [0] * len(p)
                             for p, i in zip(pads, batch)], device=device)
        keep = 1 + max(term[2] for i in batch for term in by_input[i]) if left else width
        kwargs = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if left else {}
        if left and "logits_to_keep" in accepts:
            kwargs["logits_to_keep"] = keep
        logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, -keep:]
        wanted = [(j, term) for j, i in enumerate(batch) for term in by_input[i]]
        columns = [keep - 1 - off if left else len(inputs[batch[j]]) - 1 - off for j, (_, _, off, _) in wanted]
        picked = logits[[j for j, _ in wanted], columns].float().log_softmax(-1)
        for (_, (row, choice, _, token)), logp in zip(wanted, picked):
            scores[row, choice] += logp[token].item()
    model.train(was_training)
    return scores


def hf_model(model):
    """The transformers model inside peft and distributed wrappers (whose forward takes **kwargs)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model
