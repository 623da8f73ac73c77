"""The 4-bit model path: quantization, LoRA placement, and the bitsandbytes CPU gradient bug."""
import pytest
import torch

from conftest import compose
from spectraqlora import checkpoint, modeling
from spectraqlora.config import to_train_config


@pytest.fixture(scope="module")
def tiny():
    cfg = to_train_config(compose("model=tiny_llama"))
    path = checkpoint.resolve(cfg.model)
    tokenizer = modeling.load_tokenizer(path, cfg.model)
    return cfg, path, tokenizer


def lora_model(tiny, targets=None):
    cfg, path, tokenizer = tiny
    base = modeling.load_base(path, cfg.model, cfg.quant, tokenizer, None)
    names = targets or [n for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))]
    cfg.lora.dropout = 0.0
    torch.manual_seed(0)
    net = modeling.add_lora(base, names, cfg.lora, cfg.model)
    for name, param in net.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would leave A without a gradient
            torch.nn.init.normal_(param, std=0.02)
    return net


def lora_grads(net, batch):
    net.train()
    net.zero_grad()
    net(**batch).loss.backward()
    return {n: None if p.grad is None else p.grad.clone()
            for n, p in net.named_parameters() if p.requires_grad}


def batch_for(tokenizer):
    enc = tokenizer(["the food was not great but the view is lovely"] * 2, return_tensors="pt")
    enc["labels"] = enc["input_ids"].clone()
    return enc


def eval_pass(net, batch):
    net.eval()
    with torch.no_grad():
        net(**batch)


def test_base_is_4bit_and_lora_sits_on_exactly_the_targets(tiny):
    import bitsandbytes as bnb

    targets = ["model.layers.3.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    net = lora_model(tiny, targets)
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in net.named_modules()
                     if hasattr(m, "lora_A"))
    assert adapted == sorted(targets)
    assert isinstance(net.base_model.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_grads_after_an_eval_pass_equal_grads_without_one(tiny):
    _, _, tokenizer = tiny
    batch = batch_for(tokenizer)
    net = lora_model(tiny)
    before = lora_grads(net, batch)
    eval_pass(net, batch)
    after = lora_grads(net, batch)
    assert all(g is not None and g.abs().sum() > 0 for g in before.values())
    for name, grad in before.items():
        assert after[name] is not None, name
        torch.testing.assert_close(after[name], grad, rtol=0, atol=0)


def test_without_the_guard_this_cpu_loses_gradients(tiny):
    """Shows the guard matters here: with bitsandbytes' default, the eval pass breaks grads."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("the bug needs a CPU with AVX512-BF16")
    _, _, tokenizer = tiny
    batch = batch_for(tokenizer)
    net = lora_model(tiny)
    before = lora_grads(net, batch)
    for module in net.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
    eval_pass(net, batch)
    after = lora_grads(net, batch)
    assert any(after[n] is None or not torch.equal(after[n], before[n]) for n in before)


def test_checkpoint_names_map_to_model_names(tiny):
    cfg, path, tokenizer = tiny
    base = modeling.load_base(path, cfg.model, cfg.quant, tokenizer, None)
    assert modeling.model_names(base, ["model.layers.0.mlp.up_proj"]) == ["model.layers.0.mlp.up_proj"]
    with pytest.raises(Exception, match="no counterpart"):
        modeling.model_names(base, ["encoder.layer.0.attention.self.query"])


def test_per_module_ranks_keep_alpha_over_r(tiny):
    cfg, path, tokenizer = tiny
    base = modeling.load_base(path, cfg.model, cfg.quant, tokenizer, None)
    ranks = {"model.layers.0.mlp.up_proj": 4, "model.layers.1.mlp.up_proj": 16,
             "model.layers.2.mlp.up_proj": 8}
    net = modeling.add_lora(base, list(ranks), cfg.lora, cfg.model, ranks)
    layers = net.base_model.model.model.layers
    for i, r in ((0, 4), (1, 16), (2, 8)):
        module = layers[i].mlp.up_proj
        assert module.r["default"] == r
        assert module.scaling["default"] == pytest.approx(cfg.lora.alpha / cfg.lora.r)
