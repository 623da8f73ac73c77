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

from spectraqlora.config import DatasetConfig, Task
from spectraqlora.data import batching, sources
from spectraqlora.data.chat import IGNORE_INDEX, _labeled_chat, chat_template_on
from spectraqlora.errors import UserError

log = logging.getLogger(__name__)


def load(cfg: DatasetConfig, task: Task, seed: int) -> DatasetDict:
    """Raw train/eval rows from the configured source, with the task's columns checked."""
    data = sources.rows(cfg, seed)
    _check_columns(data, cfg, task)
    _check_text(data, cfg, task)
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


ROLES = ("system", "user", "assistant")  # what chat templates render


def _check_text(data: DatasetDict, cfg: DatasetConfig, task: Task) -> None:
    """The columns the model reads as text hold text in every row: no empty cells (a CSV's
    blank, JSON's null), no numbers; chat messages are {role, content} turns with known roles
    and an assistant turn to learn."""
    columns = data["train"].column_names
    if cfg.messages_column in columns and task is Task.causal_lm:
        for split, rows in data.items():
            _check_messages(rows, cfg, split)
        return
    if task is Task.classification:
        named = {"text_column": cfg.text_column}
    else:
        named = {"response_column": cfg.response_column, **({} if cfg.prompt_template else {"prompt_column": cfg.prompt_column})}
    for key, column in named.items():
        for split, rows in data.items():
            feature = rows.features[column]
            if getattr(feature, "dtype", None) not in ("string", "large_string"):
                raise UserError(f"dataset.{key}={column} holds {getattr(feature, 'dtype', type(feature).__name__)} "
                                f"values, not text ({split} row 0: {rows[0][column]!r}): name the text column")
            empty = [i for i, v in enumerate(rows[column]) if v is None]
            if empty:
                where = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
                raise UserError(f"dataset.{key}={column}: {len(empty)} of {len(rows)} {split} rows have no text "
                                f"(an empty cell or null; rows {where}): drop or fill them")


def _check_messages(rows: Dataset, cfg: DatasetConfig, split: str) -> None:
    column = f"dataset.messages_column={cfg.messages_column}"
    for i, turns in enumerate(rows[cfg.messages_column]):
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise UserError(f"{column}: {split} row {i} is not a list of turns ({str(turns)[:80]})")
        keys = sorted({k for t in turns for k, v in t.items() if v is not None})
        if not {"role", "content"} <= set(keys):
            hint = " (ShareGPT's from/value: rename them role/content, human -> user, gpt -> assistant)" \
                if {"from", "value"} <= set(keys) else ""
            raise UserError(f"{column}: turns need the keys role and content; {split} row {i}'s turns have "
                            f"{', '.join(keys)}{hint}")
        if unknown := sorted({t["role"] for t in turns} - set(ROLES)):
            raise UserError(f"{column}: {split} row {i} has the role {', '.join(map(repr, unknown))}; the chat "
                            f"template knows {', '.join(ROLES)}: rename it")
        if not any(t["role"] == "assistant" for t in turns):
            raise UserError(f"{column}: {split} row {i} has no assistant turn: nothing in it to learn "
                            f"(drop such rows)")


def identity(raw: DatasetDict) -> dict:
    """What a run trained and evaluated on, as its selection.json records it: the row counts and
    the sha256 of the eval rows (evaluate refuses a split that changed since)."""
    import hashlib
    import json

    rows = json.dumps(raw["eval"].to_dict(), sort_keys=True, default=str).encode()
    return {"train_rows": len(raw["train"]), "eval_rows": len(raw["eval"]), "eval_sha256": hashlib.sha256(rows).hexdigest()}


def check_same_data(recorded: dict | None, raw: DatasetDict, force: bool = False) -> None:
    """The rows a finished run was evaluated on are the rows loaded now, or a UserError saying
    how they differ (force: said as a warning instead)."""
    now = identity(raw)
    if recorded is None or recorded == now:
        return
    def shown(key, value):
        return str(value)[:12] if key.endswith("sha256") else value

    changed = "; ".join(f"{k.replace('_', ' ')}: {shown(k, recorded.get(k))} -> {shown(k, now[k])}"
                        for k in now if recorded.get(k) != now[k])
    message = (f"the data differ from what the run trained and evaluated on ({changed}): the dataset's "
               f"files changed since?")
    if not force:
        raise UserError(f"{message} Restore them, or evaluate on the data as they are now with force=true")
    log.warning("%s Evaluating on them as they are now (force=true).", message)


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
    if cfg.label_names is None and not isinstance(feature, ClassLabel):
        _check_label_kinds(counts["train"], column)
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


def _check_label_kinds(count: Counter, column: str) -> None:
    """Labels that are classes: not a mix of names and numbers (which class is 1?), not the
    many distinct fractions of a regression target."""
    numbers = [k for k in count if _numeric_first(k)[0] == 0]
    if numbers and len(numbers) < len(count):
        raise UserError(f"{column} mixes class names and numbers ({_format_counts(count)}): make them one "
                        f"kind, or give the classes in id order: dataset.label_names=[...]")
    fractions = [k for k in numbers if "." in k]
    if fractions and len(numbers) > 20:
        raise UserError(f"{column} looks continuous ({len(numbers)} distinct numbers, e.g. "
                        f"{', '.join(sorted(fractions, key=float)[:3])}): classification needs classes; "
                        f"bin them into a column of class names")


def _format_counts(count: Counter, most: int = 8) -> str:
    """'a': 3 rows, ... for the first `most` labels (and how many more)."""
    items = sorted(count.items())
    shown = ", ".join(f"{k!r}: {n} rows" for k, n in items[:most])
    return shown + (f", and {len(items) - most} more labels" if len(items) > most else "")


def num_labels(data: DatasetDict, cfg: DatasetConfig, task: Task) -> int | None:
    """Classes of a classification dataset (the model's head size); None for other tasks."""
    return len(label_names(data, cfg)) if task is Task.classification else None


def tokenize(data: DatasetDict, tokenizer, cfg: DatasetConfig, task: Task,
             splits: tuple[str, ...] = ("train", "eval")) -> DatasetDict:
    """Model inputs for the task, for the given splits (evaluate: eval only); raw columns are
    dropped."""
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
        for split, rows in data.items() if split in splits
    })
    if task is Task.causal_lm:
        out = _keep_rows_with_response(out, cfg)
    if cfg.packing and "train" in out:  # train only: eval rows stay whole, so eval loss compares across settings
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
