"""Loading a base model and tokenizer, attaching a fine-tuning method (methods/ builds it), and
loading a finished run for inference. Nothing here imports a class by dotted path."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from phitune.config import Config, ModelConfig, looks_local
from phitune.errors import PhituneError
from phitune.hardware import cuda_bf16
from phitune.methods import METHODS, BuildContext
from phitune.methods.quantization import DTYPES, exact_4bit_inference, trained_quantization
from phitune.sources import check_source

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("phitune")


def resolve_dtype(model_cfg: ModelConfig, method: str, precision: str = "no") -> torch.dtype:
    """Frozen base weights of adapter methods are stored in the compute dtype (half the memory, no
    cast per forward); trained weights (full fine-tuning) stay float32 master weights."""
    if model_cfg.dtype != "auto":
        return DTYPES[model_cfg.dtype]
    if not METHODS[method].is_adapter:
        return torch.float32
    if precision == "bf16" or (torch.cuda.is_available() and cuda_bf16()):
        return torch.bfloat16
    if torch.cuda.is_available():
        return torch.float16
    return torch.float32


def _hub_error(name: str, exc: Exception) -> PhituneError:
    where = "local directory" if looks_local(name) else "hub id"
    return PhituneError(
        f"model.name_or_path: could not load {where} {name!r} ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:200]}); "
        "give an existing model directory (e.g. from `phitune create-model`) or a hub id reachable from this machine"
    )


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    name = model_cfg.tokenizer or model_cfg.name_or_path
    check_source(name, "model.tokenizer" if model_cfg.tokenizer else "model.name_or_path")
    try:
        tok = AutoTokenizer.from_pretrained(
            name, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from exc
    # A missing chat template is reported by the data pipeline, where an example needs one.
    ensure_distinct_pad(tok)
    return tok


def ensure_distinct_pad(tok: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token that is not eos, reusing one of its own tokens.

    Masking never depends on the pad id (labels come from positions), but tools downstream
    often mask `labels == pad_id`, which silently un-trains eos when the two are equal.
    """
    if tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id:
        return
    candidates = [tok.unk_token] + [t for t in tok.get_vocab() if "pad" in t.lower() or "reserved" in t.lower()]
    for cand in candidates:
        if cand and cand != tok.eos_token and tok.convert_tokens_to_ids(cand) != tok.eos_token_id:
            tok.pad_token = cand
            return
    log.warning("tokenizer has no token to pad with other than eos; padding with eos (labels are masked by position)")
    tok.pad_token = tok.eos_token


HEADS = {
    "causal": "AutoModelForCausalLM",
    "sequence": "AutoModelForSequenceClassification",
    "token": "AutoModelForTokenClassification",
}
PEFT_TASKS = {"causal": "CAUSAL_LM", "sequence": "SEQ_CLS", "token": "TOKEN_CLS"}


def load_model(
    cfg: Config, device: torch.device, precision: str = "no", head: str = "causal", labels: list[str] | None = None
) -> PreTrainedModel:
    """`precision` is Accelerate's mixed-precision mode ("no", "bf16", "fp16"); `head` picks the
    transformers class: a causal LM, or a sequence / token classifier over `labels`."""
    import transformers

    auto = getattr(transformers, HEADS[head])
    m = cfg.model
    kwargs: dict = dict(
        revision=m.revision, trust_remote_code=m.trust_remote_code, dtype=resolve_dtype(m, cfg.method.name, precision)
    )
    if labels is not None:
        kwargs.update(
            num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)}
        )
    if m.attn_implementation != "auto":
        kwargs["attn_implementation"] = m.attn_implementation
    method = METHODS[cfg.method.name]
    if method.load_options is not None:  # QLoRA: the 4-bit base
        kwargs.update(method.load_options(cfg.method, device))
    try:
        model = auto.from_pretrained(m.name_or_path, **kwargs)
    except ImportError as exc:
        raise PhituneError(
            f"{exc}".splitlines()[0] + "; install the missing package (for QLoRA: pip install 'phitune[qlora]')"
        ) from exc
    except (OSError, ValueError) as exc:
        if head != "causal" and "Unrecognized configuration class" in str(exc):
            raise PhituneError(
                f"task.head: transformers has no {HEADS[head]} for this model's architecture; "
                "use the generative task (task.head: false)"
            ) from exc
        raise _hub_error(m.name_or_path, exc) from exc
    if m.attn_implementation == "auto" and device.type == "cpu":
        from phitune.attention import use_where_sdpa

        use_where_sdpa(model)
    if getattr(model.config, "phitune_untrained", False):
        log.info("note: %s is an UNTRAINED model made by phitune create-model (random weights)", m.name_or_path)
    if method.after_load is not None:
        method.after_load(model)
    return model


def merged_model(model: Any, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A PEFT model folded into a plain transformers model: PEFT's merge, or over a 4-bit base
    `merged_quantized`."""
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        return merged_quantized(model, dtype)
    return model.merge_and_unload()


def merged_quantized(model: Any, dtype: torch.dtype) -> PreTrainedModel:
    """A PEFT model over a 4-bit base, merged into a plain full-precision model: each adapted layer
    gets dequant(4-bit weight) + the adapter's delta, so the result computes exactly what the run
    trained. (PEFT's own merge re-quantizes the sum to 4 bits; folding into the unquantised
    original gives a model the adapter was never trained with.)"""
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    merged: dict[str, torch.Tensor] = {}
    prefix = "base_model.model."
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is None or type(base).__name__ != "Linear4bit":
            continue
        weight = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        for adapter in module.active_adapters:
            weight = weight + module.get_delta_weight(adapter).float()
        merged[name.removeprefix(prefix) + ".weight"] = weight
        if base.bias is not None:
            merged[name.removeprefix(prefix) + ".bias"] = base.bias.data.float()
    config = model.get_base_model().config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    original = model.get_base_model().state_dict()
    state = {}
    for key in plain.state_dict():
        value = merged.get(key, original.get(key))
        if value is None:
            raise PhituneError(
                f"merge: {key} is not in the 4-bit model; merge this QLoRA adapter with --base on the "
                "unquantised model instead"
            )
        state[key] = value.to(dtype)
    plain.load_state_dict(state, strict=True)
    return plain


def apply_method(model: Any, cfg: Config, tokenizer: PreTrainedTokenizerBase, head: str = "causal") -> Any:
    """Attach the method; with a classification head, PEFT's SEQ_CLS / TOKEN_CLS task types train
    the head in full and save it with the adapter."""
    context = BuildContext(PEFT_TASKS[head], cfg.model.tokenizer or cfg.model.name_or_path)
    return METHODS[cfg.method.name].build(model, cfg.method, context)


def num_virtual_tokens(model: Any) -> int:
    """Prompt-learning methods prepend virtual tokens whose outputs the loss must skip."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return 0
    active = peft_config[getattr(model, "active_adapter", "default")]
    return getattr(active, "num_virtual_tokens", 0) or 0 if active.is_prompt_learning else 0


# --- loading a finished run for inference -------------------------------------------------


def resolve_trained(path: str | Path) -> tuple[str, str | None]:
    """A training output dir, an adapter dir or a model dir -> (base model, adapter dir or None)."""

    p = Path(path)
    if (p / "adapter" / "adapter_config.json").is_file():
        p = p / "adapter"
    elif (p / "model" / "config.json").is_file():
        return str(p / "model"), None
    if (p / "adapter_config.json").is_file():
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise PhituneError(f"{p}/adapter_config.json: no base_model_name_or_path; pass the base model with --base")
        return base, str(p)
    return str(path), None


def refuse_classifier(path: str) -> None:
    """A classification-head run (task.head) is not a chat model: generating or merging it into a
    causal LM would silently drop the trained head."""

    specs = [Path(path) / "task.json", Path(path).parent / "task.json"]  # OUT/adapter, or OUT beside it
    spec = next((p for p in specs if p.is_file()), None)
    if spec is not None and json.loads(spec.read_text()).get("head"):
        raise PhituneError(
            f"{path}: a classification-head run (task.json: head true) cannot generate text or be merged "
            "into a causal LM; load it with AutoModelForSequenceClassification / "
            "AutoModelForTokenClassification + PeftModel (see docs/guides/methods.md, Objectives)"
        )


def load_for_inference(
    model_path: str,
    adapter: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    head: str = "causal",
    labels: list[str] | None = None,
    safetensors_only: bool = False,
) -> tuple[Any, PreTrainedTokenizerBase]:  # a transformers or PEFT model
    """Base (+ adapter) in eval mode with its tokenizer; the same path `generate`, `eval` and tests
    use. `head`/`labels` load a classification run (or, for a base, a freshly initialised head:
    seeded, so a baseline scores the same every time). `safetensors_only` (the service) refuses
    pickled weights (.bin) rather than unpickle them."""
    import transformers
    from transformers import AutoTokenizer

    if adapter is None:
        check_source(str(model_path), "model")
        model_path, adapter = resolve_trained(model_path)
    check_source(str(model_path), "model")
    if adapter:
        check_source(str(adapter), "--adapter")
    if head == "causal":
        refuse_classifier(adapter or model_path)
    tok_src = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_path
    kwargs: dict = {"use_safetensors": True} if safetensors_only else {}
    if labels is not None:
        kwargs.update(
            num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)}
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=trust_remote_code)
        torch.manual_seed(0)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        quantization = trained_quantization(adapter)
        if quantization is not None:  # placed (and quantized) on the device as it loads: a 4-bit model is not moved
            kwargs.update(quantization_config=quantization, device_map={"": str(device)})
        model = getattr(transformers, HEADS[head]).from_pretrained(
            model_path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise _hub_error(model_path, exc) from exc
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    ensure_distinct_pad(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id  # a sequence head finds each row's last token by it
    if quantization is not None:
        exact_4bit_inference(model)
    return (model if quantization is not None else model.to(device)).eval(), tokenizer
