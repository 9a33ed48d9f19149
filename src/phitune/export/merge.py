"""`phitune merge`: fold an adapter into its base and write a plain transformers model."""

from __future__ import annotations

from pathlib import Path

from phitune.errors import PhituneError
from phitune.methods.quantization import DTYPES
from phitune.models import load_for_inference, merged_model, resolve_trained
from phitune.outputs import refuse_non_empty, staged


def merge(
    source: str | Path, output: str | Path, *, dtype: str = "float32", base: str | None = None, overwrite: bool = False
) -> Path:
    source, output = Path(source), Path(output)
    if not source.exists():
        raise PhituneError(f"{source}: not found; pass a training output dir or an adapter dir")
    base_path, adapter = resolve_trained(source)
    if base:
        base_path = base
    if adapter is None:
        raise PhituneError(
            f"{source}: holds no adapter (a full fine-tune is already a complete model in {base_path}); nothing to "
            "merge"
        )
    refuse_non_empty(output, overwrite)
    model, tokenizer = load_for_inference(base_path, adapter, dtype=DTYPES[dtype], device="cpu")
    if not hasattr(model, "merge_and_unload"):
        raise PhituneError(
            f"{adapter}: this adapter type ({type(model.peft_config['default']).__name__}) cannot be merged; "
            "serve it with the base model instead"
        )
    merged = merged_model(model, DTYPES[dtype])
    merged.config.use_cache = True
    with staged(output) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return output
