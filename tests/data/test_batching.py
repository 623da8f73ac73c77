"""dataset.batching: a padding-free batch gives every row the loss and gradient of the padded
batch, and the loss computed where the labels are equals the model's own."""
import pytest
import torch
import transformers

from spectraqlora.config import Batching, Task, compose, to_train_config
from spectraqlora.data import batching, scoring
from spectraqlora.data.chat import IGNORE_INDEX
from spectraqlora.errors import UserError
from spectraqlora.run import losses, modeling
from spectraqlora.store import checkpoint


def tiny_lora(task: Task):
    cfg = to_train_config(compose("model=tiny_llama", f"model.task={task.value}", "lora.dropout=0"))
    path = checkpoint.resolve(cfg.model)
    tokenizer = modeling.load_tokenizer(path, cfg.model)
    base = modeling.load_base(path, cfg.model, cfg.quant, tokenizer, 3 if task is Task.classification else None)
    torch.manual_seed(0)
    net = modeling.add_lora(base, [n for n, _ in base.named_modules() if n.endswith(("q_proj", "down_proj"))],
                            cfg.lora, cfg.model)
    for name, param in net.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would leave A without a gradient
            torch.nn.init.normal_(param, std=0.05)
    return net, tokenizer


def rows(tokenizer, task: Task) -> list[dict]:
    """Rows of different lengths; causal LM rows learn their last tokens only."""
    texts = ["the food was great", "the service was not pleasant but the view is lovely",
             "awful", "the coffee is stale and the waiter was rude to us all evening long"]
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        labels = i % 3 if task is Task.classification else [IGNORE_INDEX] * (len(ids) - 2) + ids[-2:]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def loss_and_grads(net, tokenizer, task: Task, mode: Batching):
    hf = scoring.hf_model(net)
    if mode is Batching.padding_free:
        batching.attend_per_row(hf)
    loss_fn = losses.LabelLoss(task, hf, mode is Batching.padding_free)
    batch = batching.collator(tokenizer, task, mode)(rows(tokenizer, task))
    net.train()
    net.zero_grad()
    inputs = loss_fn.model_inputs(dict(batch))
    labels = inputs.pop("labels")
    outputs = net(**inputs)
    loss = loss_fn(outputs, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    return loss.detach(), outputs["logits"].detach(), grads, batch


@pytest.mark.parametrize("task", [Task.causal_lm, Task.classification])
@pytest.mark.parametrize("per_row", [True, False], ids=["sdpa_rows", "sdpa_block_mask"])
def test_a_padding_free_batch_gives_each_row_the_padded_loss_and_gradient(task, per_row, monkeypatch):
    net, tokenizer = tiny_lora(task)
    padded_loss, padded_logits, padded_grads, padded = loss_and_grads(net, tokenizer, task, Batching.padded)
    if not per_row:  # transformers' own sdpa, rows kept apart by its block-diagonal mask
        monkeypatch.setattr(batching, "attend_per_row", lambda hf: None)
    free_loss, free_logits, free_grads, free = loss_and_grads(net, tokenizer, task, Batching.padding_free)
    assert scoring.hf_model(net).config._attn_implementation == ("sdpa_rows" if per_row else "sdpa")
    assert padded["input_ids"].shape[0] == 4 and free["input_ids"].shape[0] == 1
    assert free["input_ids"].numel() < padded["input_ids"].numel()  # no padding computed
    assert torch.allclose(free_loss, padded_loss, atol=1e-5), (free_loss, padded_loss)
    if task is Task.classification:  # one row of logits per row, each the padded row's
        assert free_logits.shape == padded_logits.shape == (4, 3)
        assert torch.allclose(free_logits, padded_logits, atol=1e-4)
    assert padded_grads.keys() == free_grads.keys() and len(free_grads) > 4
    for name, grad in padded_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(free_grads[name], grad, atol=1e-4, rtol=1e-3), name
    # and the loss where the labels are is the model's own, computed over every position
    with torch.no_grad():
        own = net(**padded).loss
    assert torch.allclose(padded_loss, own, atol=1e-5), (padded_loss, own)


def test_the_causal_lm_head_runs_only_where_a_label_is():
    net, tokenizer = tiny_lora(Task.causal_lm)
    head = scoring.hf_model(net).lm_head
    seen = []
    handle = head.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        loss_and_grads(net, tokenizer, Task.causal_lm, Batching.padding_free)
    finally:
        handle.remove()
    assert seen == [(1, 4 * 2, head.out_features)]  # the positions before each row's 2 targets


def test_auto_picks_padding_free_for_decoders_and_padded_for_encoders():
    net, _ = tiny_lora(Task.classification)
    assert batching.resolve(Batching.auto, scoring.hf_model(net), Task.classification, False) is Batching.padding_free
    assert batching.resolve(Batching.auto, scoring.hf_model(net), Task.classification, True) is Batching.padded
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100))
    assert batching.resolve(Batching.auto, bert, Task.classification, False) is Batching.padded
    assert batching.resolve(Batching.grouped, bert, Task.classification, False) is Batching.grouped
    with pytest.raises(UserError, match="dataset.batching=padding_free: BertForSequenceClassification is not a "
                                        "decoder-only model.*use dataset.batching=grouped"):
        batching.resolve(Batching.padding_free, bert, Task.classification, False)


def test_eval_rows_come_longest_first():
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": [[1], [1, 2, 3], [1, 2], [4, 5, 6]]})
    assert batching.longest_first(data)["input_ids"] == [[1, 2, 3], [4, 5, 6], [1, 2], [1]]

