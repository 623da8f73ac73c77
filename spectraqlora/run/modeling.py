"""Load the base model quantized by bitsandbytes and put LoRA adapters on exactly the selected modules."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from spectraqlora.config import LoraConfig, ModelConfig, Quant, QuantConfig, Task
from spectraqlora.errors import UserError


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_tokenizer(path: Path, model: ModelConfig):
    """The checkpoint's tokenizer, or model.tokenizer's (a random-init checkpoint saved its own)."""
    from transformers import AutoTokenizer

    source = model.tokenizer if model.tokenizer and model.random_init is None else path
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token is None:  # Llama and friends ship none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# What transformers names the new head of a ...ForSequenceClassification model.
NEW_HEADS = ["classifier", "score"]  # BERT and friends; Llama, Mistral, Qwen, GPT-2


def heads(model: ModelConfig) -> list[str]:
    """Modules trained whole (and kept out of quantization): model.head_modules, or for a
    classification task the new head under either name transformers gives it."""
    if model.head_modules or model.task is not Task.classification:
        return list(model.head_modules)
    return NEW_HEADS


def bnb_config(quant: QuantConfig, model: ModelConfig, fsdp: bool = False):
    from transformers import BitsAndBytesConfig

    skip = list(dict.fromkeys([*model.skip_quant_modules, *heads(model)]))
    if quant.mode is Quant.none:
        return None
    if quant.mode is Quant.int8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.mode.value,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype or model.dtype),
        bnb_4bit_quant_storage=getattr(torch, quant_storage(quant, model, fsdp)),
        llm_int8_skip_modules=skip,
    )


def quant_storage(quant: QuantConfig, model: ModelConfig, fsdp: bool) -> str:
    """The dtype 4-bit weights are packed in. FSDP (FSDP-QLoRA) shards only float tensors of
    one dtype: there it is the compute dtype, and the model's other weights must match it."""
    if not fsdp:
        return quant.storage_dtype or "uint8"
    storage = quant.storage_dtype or quant.compute_dtype or model.dtype
    if storage != model.dtype:
        raise UserError(f"FSDP shards the 4-bit weights with the others: quant.storage_dtype "
                        f"({storage}) must equal model.dtype ({model.dtype}); set "
                        f"quant.storage_dtype={model.dtype} or model.dtype={storage}")
    return storage


def check_task(path: Path, model: ModelConfig) -> None:
    """A checkpoint whose architecture transformers has no head for model.task is refused before
    it loads (from its config.json's model_type), naming the tasks it has; checkpoints with their
    own code (trust_remote_code) register their heads themselves and are not checked."""
    from transformers.models.auto import modeling_auto as auto

    by_task = {Task.classification: auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
             Task.causal_lm: auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
             Task.seq2seq: auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES}
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return  # transformers says what is wrong with the config when it loads it
    if model.trust_remote_code or model_type is None or model_type in by_task[model.task]:
        return
    has = [task.value for task, names in by_task.items() if model_type in names]
    raise UserError(f"model.task={model.task.value}: transformers has no {model.task.value} head for "
                    f"{model_type} models ({model.name_or_path})"
                    + (f"; this one has: model.task={' or '.join(has)}" if has else ""))


def load_base(path: Path, model: ModelConfig, quant: QuantConfig, tokenizer, num_labels: int | None,
              fsdp: bool = False):
    """The frozen base, quantized as configured, on this process's GPU if there is one (under
    FSDP, where accelerate places it)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    kwargs = dict(
        quantization_config=bnb_config(quant, model, fsdp),
        dtype=getattr(torch, model.dtype),
        trust_remote_code=model.trust_remote_code,
    )
    if not fsdp:  # FSDP places (and with cpu_ram_efficient_loading, loads) itself
        kwargs["device_map"] = {"": device()}
    if model.task is Task.classification:
        net = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id, **kwargs)
    elif model.task is Task.seq2seq:
        net = AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs)
    else:
        net = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    disable_cpu_bf16_repack(net)
    return net


def disable_cpu_bf16_repack(net: torch.nn.Module) -> None:
    """Guard against a silent bitsandbytes gradient bug on CPUs with AVX512-BF16.

    A no_grad forward in eval mode repacks each 4-bit weight in place for a faster inference
    kernel; later training forwards then take a path without input gradients, so LoRA grads of
    the lower layers come out None or wrong (any train -> eval -> train loop is hit). Turning
    the repack off keeps gradients exact; tests/run/test_modeling.py pins it.
    """
    for module in net.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def model_names(net: torch.nn.Module, checkpoint_names: list[str]) -> list[str]:
    """The model's own names for checkpoint module names (a head class adds a prefix such as
    `bert.`; some checkpoints carry the base prefix the bare model lacks)."""
    modules = dict(net.named_modules())
    prefix = getattr(net, "base_model_prefix", "")
    out = []
    for name in checkpoint_names:
        options = [name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
        found = next((o for o in options if o in modules), None)
        if found is None:
            raise UserError(f"checkpoint module {name} has no counterpart in the loaded "
                            f"{type(net).__name__}; is model.task right?")
        out.append(found)
    return out


def add_lora(net, targets: list[str], lora: LoraConfig, model: ModelConfig,
             ranks: dict[str, int] | None = None):
    """LoRA on exactly `targets` (full module names); head modules are trained whole. No
    targets (selection=none): a peft model whose only trained modules are the heads.

    `ranks` (model name -> r) overrides lora.r per module; alpha follows so that alpha / r, the
    scale of the update, stays that of lora.alpha / lora.r.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.utils.constants import DUMMY_TARGET_MODULES

    ranks = ranks or {}

    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias.value,
        use_rslora=lora.use_rslora,
        target_modules=targets or DUMMY_TARGET_MODULES,  # none: the heads alone
        modules_to_save=heads(model) or None,
        # peft matches these keys as regexes against the end of module names
        rank_pattern={re.escape(n): r for n, r in ranks.items()},
        alpha_pattern={re.escape(n): lora.alpha * r / lora.r for n, r in ranks.items()},
    )
    return get_peft_model(net, config)


def enable_checkpointing(net) -> None:
    """Non-reentrant activation checkpointing, without input gradients.

    transformers turns input gradients on along with checkpointing, because reentrant
    checkpointing needs them to reach the adapters. Non-reentrant checkpointing does not, and
    without them backward stops at the lowest adapted layer instead of running down through
    every frozen layer to the embeddings (tests/test_efficiency.py counts the layer calls).
    """
    base = net.get_base_model()
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(base, "_require_grads_hook"):
        base.disable_input_require_grads()


def trainable_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def load_adapter(net, adapter_dir: Path, allow_pickle: bool = False):
    """Base + a saved adapter, for evaluation. Pickle adapters (.bin) can run code: refused
    unless allow_pickle."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        if not (adapter_dir / "adapter_model.bin").is_file():
            raise UserError(f"{adapter_dir} holds no adapter_model.safetensors")
        if not allow_pickle:
            raise UserError(f"{adapter_dir} holds a pickle adapter (adapter_model.bin), which can "
                            f"run code when loaded; re-save it as safetensors, or add "
                            f"allow_pickle=true if you trust its source")
    return PeftModel.from_pretrained(net, adapter_dir, is_trainable=False)


def check_quant_support(quant: QuantConfig) -> None:
    """Refuse early when the installed bitsandbytes cannot quantize on this machine."""
    if quant.mode is Quant.none:
        return
    try:
        import bitsandbytes  # noqa: F401 (importing it is the check)
    except Exception as exc:  # ImportError, or a RuntimeError from a broken native library
        raise UserError(f"quant={quant.mode.value} needs a working bitsandbytes "
                        f"({str(exc).splitlines()[0]}); use quant=none") from exc
