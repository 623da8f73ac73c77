"""A run's rows: loaded from their source (sources.py) and checked for the task's columns and
labels, then tokenized per task.

`tokenize` turns raw rows into model inputs: `input_ids`, `attention_mask` and `labels` (a class
id, or token ids with -100 on prompt tokens so causal LMs learn the response only). Causal LMs
whose tokenizer has a chat template see rows rendered by it (chat.py), the loss on assistant
turns only; scoring.py scores them on labeled data like a classifier.
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter

from datasets import ClassLabel, Dataset, DatasetDict

from spectraqlora import batching, sources
from spectraqlora.chat import IGNORE_INDEX, _labeled_chat, chat_template_on
from spectraqlora.config import DatasetConfig, Task
from spectraqlora.errors import UserError

log = logging.getLogger(__name__)


def load(cfg: DatasetConfig, task: Task, seed: int) -> DatasetDict:
    """Raw train/eval rows from the configured source, with the task's columns checked."""
    data = sources.rows(cfg, seed)
    _check_columns(data, cfg, task)
    if task is Task.classification:
        _check_labels(data, cfg)
    return data


def _check_columns(data: DatasetDict, cfg: DatasetConfig, task: Task) -> None:
    columns = data["train"].column_names
    if cfg.messages_column in columns and task is not Task.causal_lm:
        raise UserError(f"dataset={cfg.name} holds chat messages (column {cfg.messages_column}): "
                        f"it trains causal LMs, not model.task={task.value}")
    if task is Task.classification:
        needed = [cfg.text_column, cfg.label_column]
    elif cfg.messages_column in columns:
        needed = []
    elif cfg.prompt_template:
        needed = [cfg.response_column]
    else:
        needed = [cfg.prompt_column, cfg.response_column]
    missing = [c for c in needed if c not in columns]
    if missing:
        keys = {cfg.text_column: "text_column", cfg.label_column: "label_column",
                cfg.prompt_column: "prompt_column", cfg.response_column: "response_column"}
        named = ", ".join(f"dataset.{keys[c]}={c}" for c in missing)
        chat = f" (or dataset.messages_column={cfg.messages_column})" if task is Task.causal_lm else ""
        raise UserError(f"the dataset has no column for {named}{chat}; its columns are: "
                        f"{', '.join(columns)}")


def label_key(value) -> str:
    """A label as the class it names: stripped text, and one spelling per number (1, 1.0 and
    " 1" are all "1"); "" for a missing label."""
    text = "" if value is None else str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else str(number)


def _numeric_first(key: str):
    try:
        return (0, float(key), "")
    except ValueError:
        return (1, 0.0, key)


def label_names(data: DatasetDict, cfg: DatasetConfig) -> list[str]:
    """Class names in id order: dataset.label_names, else the ClassLabel's names, else the
    distinct labels of the training split (numbers in numeric order)."""
    feature = data["train"].features[cfg.label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    if cfg.label_names is not None:
        return [label_key(n) for n in cfg.label_names]
    return sorted({label_key(v) for v in data["train"][cfg.label_column]}, key=_numeric_first)


def _label_counts(rows: Dataset, cfg: DatasetConfig) -> Counter:
    feature = rows.features[cfg.label_column]
    if isinstance(feature, ClassLabel):
        return Counter(feature.names[i] for i in rows[cfg.label_column])
    return Counter(label_key(v) for v in rows[cfg.label_column])


def _check_labels(data: DatasetDict, cfg: DatasetConfig) -> None:
    """Refuse labels a classifier cannot learn from or be judged on, with the counts; log the
    label set per split."""
    column = f"dataset.label_column={cfg.label_column}"
    feature = data["train"].features[cfg.label_column]
    if cfg.label_names is not None and isinstance(feature, ClassLabel) and \
            [label_key(n) for n in cfg.label_names] != list(feature.names):
        raise UserError(f"dataset.label_names={list(cfg.label_names)} but the dataset names its "
                        f"classes {feature.names}: drop dataset.label_names or match them")
    counts = {split: _label_counts(rows, cfg) for split, rows in data.items()}
    names = label_names(data, cfg)
    for split, count in counts.items():
        if count[""]:
            raise UserError(f"{column}: {count['']} of {sum(count.values())} {split} rows have "
                            f"an empty label; drop or label them")
    if cfg.label_names is not None:
        for split, count in counts.items():
            if outside := sorted(set(count) - set(names)):
                examples = ", ".join(f"{k!r} ({count[k]} rows)" for k in outside[:5])
                raise UserError(f"{column}: {split} labels outside dataset.label_names="
                                f"{list(cfg.label_names)}: {examples}")
    if len(counts["train"]) < 2:
        raise UserError(f"{column}: the training split has a single class "
                        f"({_format_counts(counts['train'])}): a classifier learns nothing from it "
                        f"and scores 1.0 on it; check the column, dataset.train_split and "
                        f"dataset.train_size")
    if unseen := sorted(set(counts["eval"]) - set(counts["train"])):
        raise UserError(f"{column}: eval labels never seen in training: "
                        f"{_format_counts(Counter({k: counts['eval'][k] for k in unseen}))}; "
                        f"training has {_format_counts(counts['train'])}")
    log.info("data: %s; labels (train / eval): %s",
             ", ".join(f"{split} {len(rows)} rows" for split, rows in data.items()),
             ", ".join(f"{n} {counts['train'][n]} / {counts['eval'][n]}" for n in names))


def _format_counts(count: Counter) -> str:
    return ", ".join(f"{k!r}: {n} rows" for k, n in sorted(count.items()))


def num_labels(data: DatasetDict, cfg: DatasetConfig, task: Task) -> int | None:
    """Classes of a classification dataset (the model's head size); None for other tasks."""
    return len(label_names(data, cfg)) if task is Task.classification else None


def tokenize(data: DatasetDict, tokenizer, cfg: DatasetConfig, task: Task) -> DatasetDict:
    """Model inputs for the task; raw columns are dropped."""
    if task is Task.classification:
        names = label_names(data, cfg)
        as_id = {n: i for i, n in enumerate(names)}
        numeric = isinstance(data["train"].features[cfg.label_column], ClassLabel)

        def encode(row):
            enc = tokenizer(row[cfg.text_column], truncation=True, max_length=cfg.max_length)
            enc["labels"] = row[cfg.label_column] if numeric else as_id[label_key(row[cfg.label_column])]
            return enc
    else:
        chat = chat_template_on(tokenizer, cfg, task)
        if cfg.messages_column in data["train"].column_names and not chat:
            raise UserError(f"dataset={cfg.name} holds chat messages, which need a tokenizer with a "
                            f"chat template ({'dataset.chat_template=false' if cfg.chat_template.lower() == 'false' else 'this one has none'}); "
                            f"use a chat model such as model=smollm2")

        log.info("data: rows rendered %s (dataset.chat_template=%s)", "with the tokenizer's chat template, "
                 "the assistant's turns learned" if chat else "as plain prompt and response text, the "
                 "response learned", cfg.chat_template)

        def encode(row):
            if chat:
                return _labeled_chat(tokenizer, _messages(row, cfg), cfg.max_length)
            prompt = _prompt(row, cfg)
            return _prompt_response(tokenizer, prompt, row[cfg.response_column], cfg.max_length, task)

    out = DatasetDict({
        split: rows.map(encode, remove_columns=rows.column_names, desc=f"tokenize {split}")
        for split, rows in data.items()
    })
    if task is Task.causal_lm:
        out = _keep_rows_with_response(out, cfg)
    if cfg.packing:  # train only: eval rows stay whole, so eval loss compares across settings
        out["train"] = pack(out["train"], cfg.max_length)
    out["eval"] = batching.longest_first(out["eval"])
    return out


def _keep_rows_with_response(data: DatasetDict, cfg: DatasetConfig) -> DatasetDict:
    """Causal LMs: drop rows that truncation to dataset.max_length left without a response token
    (nothing to learn, and a NaN loss for a batch of them); refuse when a split keeps none."""
    kept = {}
    for split, rows in data.items():
        has_response = [any(t != IGNORE_INDEX for t in labels) for labels in rows["labels"]]
        if not any(has_response):
            longest = max(len(labels) for labels in rows["labels"]) if len(rows) else 0
            raise UserError(f"dataset.max_length={cfg.max_length} leaves no response token in any "
                            f"of the {len(rows)} {split} rows (the prompt fills all {longest} "
                            f"tokens): raise dataset.max_length")
        kept[split] = rows if all(has_response) else rows.select(
            [i for i, keep in enumerate(has_response) if keep])
    log.info("data: %s keep response tokens after truncation to dataset.max_length=%d%s",
             ", ".join(f"{split} {len(kept[split])} of {len(rows)} rows" for split, rows in data.items()),
             cfg.max_length, "" if all(len(kept[s]) == len(data[s]) for s in data) else
             " (the others are dropped)")
    return DatasetDict(kept)


def pack(rows: Dataset, block: int) -> Dataset:
    """Rows concatenated and cut into blocks of `block` tokens (the last may be shorter), so
    batches carry no padding. Labels move with their tokens: prompts stay masked."""
    def blocks(batch):
        ids = list(itertools.chain.from_iterable(batch["input_ids"]))
        labels = list(itertools.chain.from_iterable(batch["labels"]))
        cuts = range(0, len(ids), block)
        return {"input_ids": [ids[i:i + block] for i in cuts],
                "labels": [labels[i:i + block] for i in cuts],
                "attention_mask": [[1] * len(ids[i:i + block]) for i in cuts]}

    return rows.map(blocks, batched=True, batch_size=1000, remove_columns=rows.column_names,
                    desc="pack train")


def _prompt(row: dict, cfg: DatasetConfig) -> str:
    return cfg.prompt_template.format(**row) if cfg.prompt_template else row[cfg.prompt_column]


def _messages(row: dict, cfg: DatasetConfig, response: str | None = None) -> list[dict]:
    """A row as chat messages: its messages column, or its prompt and response as one exchange
    (surrounding whitespace stripped: the template lays out the turns)."""
    if cfg.messages_column in row:
        return row[cfg.messages_column]
    response = row[cfg.response_column] if response is None else response
    return [{"role": "user", "content": _prompt(row, cfg).strip()},
            {"role": "assistant", "content": response.strip()}]


def _prompt_response(tokenizer, prompt: str, response: str, max_length: int, task: Task) -> dict:
    """Causal LM: prompt + response + eos with the prompt masked out of the labels.
    Seq2seq: the prompt is the encoder input, the response the labels."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if task is Task.seq2seq:
        return {"input_ids": p[:max_length], "attention_mask": [1] * min(len(p), max_length),
                "labels": r[:max_length]}
    if tokenizer.bos_token_id is not None:
        p = [tokenizer.bos_token_id] + p
    ids = (p + r)[:max_length]
    labels = ([IGNORE_INDEX] * len(p) + r)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
