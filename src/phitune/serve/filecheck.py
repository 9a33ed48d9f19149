"""A file checked the way a job will use it: phitune's own reader and validator for a served
model (the same config a job builds), every problem with its line, and a few examples rendered
through the model's chat template with the trained tokens marked. For `GET /v1/files/{id}/check`
and the portal's new-job page: users see their data as the model will, before paying for compute."""

from __future__ import annotations

import re
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from phitune.errors import PhituneError
from phitune.serve.db import Job
from phitune.serve.errors import ApiError
from phitune.serve.jobconfig import build_config, choose_hyperparameters

if TYPE_CHECKING:
    from phitune.config import Config
    from phitune.serve.settings import Settings

MAX_PROBLEMS = 100
CHECK_BYTES = 4 * 2**20  # a larger file is checked on its first 4 MiB (whole lines): memory stays bounded
MAX_CHECKS = 2  # file checks at once per API process; more wait CHECK_WAIT seconds, then 503
CHECK_WAIT = 5.0
_CHECKS = threading.BoundedSemaphore(MAX_CHECKS)
WHERE = re.compile(r"^(?P<file>file-[0-9a-zA-Z]+):(?P<line>\d+)(?:[:\s]+)?(?P<message>.*)$", re.S)
_tokenizers: dict[str, object] = {}
_tokenizers_lock = threading.Lock()


def public_text(settings: Settings, text: str) -> str:
    """A validator message with the server's storage path taken out: `file-abc:3: ...`."""
    text = re.sub(re.escape(str(settings.storage)) + r"/(?:files|checks/[^/]+)/", "", text)  # stored or sampled
    return text.replace(".jsonl", "")


def _problem(settings: Settings, text: str) -> dict:
    text = public_text(settings, text)
    m = WHERE.match(text)
    if m is None:
        return {"line": None, "message": text}
    return {"line": int(m["line"]), "message": m["message"] or text}


def _tokenizer(model: str, cfg: Config):
    """The served model's tokenizer as training loads it (`models.load_tokenizer`, chat template
    and pad token included), once per process."""
    from phitune.models import load_tokenizer

    with _tokenizers_lock:
        if model not in _tokenizers:
            _tokenizers[model] = load_tokenizer(cfg.model)
        return _tokenizers[model]


def segments(tokenizer, input_ids: list[int], labels: list[int]) -> list[dict]:
    """The example as runs of text, each trained (its tokens are in the loss) or not."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(input_ids, labels):
        trained = label != -100
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return [{"text": tokenizer.decode(ids), "trained": trained} for trained, ids in runs]


def check_file(settings: Settings, file_id: str, model: str, method: str = "supervised", examples: int = 3) -> dict:
    """The check of one uploaded file for one served model; a PhituneError for a config that cannot
    be built (the message names the key)."""
    from phitune.data.dataset import read_split

    job = Job(
        id="ftjob-check",
        model=model,
        training_file=file_id,
        validation_file=None,
        seed=0,
        method={"type": method},
        hyperparameters={},
        phitune={},
    )
    cfg = build_config(settings, job, choose_hyperparameters({}, 100))
    if not _CHECKS.acquire(timeout=CHECK_WAIT):
        raise ApiError(
            503,
            f"{MAX_CHECKS} file checks are running on this server; retry in a few seconds",
            headers={"Retry-After": "2"},
        )
    try:
        with _sample(settings.file_path(file_id), settings.storage / "checks") as (path, checked, whole):
            split, spec = read_split(str(path), cfg.data, cfg.task)
            out = _report(settings, split, file_id, model, checked, whole)
            if split.samples:
                _preview(settings, out, split, spec, cfg, model, examples)
    finally:
        _CHECKS.release()
    return out


@contextmanager
def _sample(path: Path, scratch: Path):
    """(the path to check, bytes checked, file size): the file itself, or its first CHECK_BYTES
    cut at a line's end in a temporary file under `scratch`, named like the file (problems still
    read `file-id:line`)."""
    size = path.stat().st_size
    if size <= CHECK_BYTES:
        yield path, size, size
        return
    with path.open("rb") as f:
        head = f.read(CHECK_BYTES)
    head = head[: head.rfind(b"\n") + 1] or head
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        sample = Path(tmp) / path.name
        sample.write_bytes(head)
        yield sample, len(head), size


def _report(settings: Settings, split, file_id: str, model: str, checked: int, whole: int) -> dict:
    out = {
        "object": "file.check",
        "file_id": file_id,
        "model": model,
        "checked_bytes": checked,
        "sampled": checked < whole,
        "format": split.format,
        "examples": len(split.samples),
        "valid": not split.errors and bool(split.samples),
        "errors": [_problem(settings, p) for p in split.errors[:MAX_PROBLEMS]],
        "errors_total": len(split.errors),
        "warnings": [],
        "preview": [],
    }
    if not split.samples and not split.errors:
        out["errors"] = [{"line": None, "message": "the file has no examples"}]
    return out


def _preview(settings: Settings, out: dict, split, spec, cfg: Config, model: str, examples: int) -> None:
    """A few examples through the model's chat template, the trained tokens marked."""
    from phitune.data.dataset import tokenize_split

    shown = type(split)(split.path, split.format, samples=split.samples[:examples])
    tokenizer = _tokenizer(model, cfg)
    try:
        tokenize_split(shown, tokenizer, cfg.data.max_length, spec)
    except PhituneError as exc:
        out["errors"].append(_problem(settings, exc.one_line()))
        out["valid"] = False
        return
    out["warnings"] = [public_text(settings, w) for w in split.warnings + shown.warnings]
    for (where, _), example in zip(shown.kept, shown.examples):
        ids, labels = _first_sequence(example)
        out["preview"].append(
            {
                "line": _problem(settings, where)["line"],
                "tokens": len(ids),
                "trained_tokens": sum(1 for x in labels if x != -100),
                "segments": segments(tokenizer, ids, labels),
            }
        )


def _first_sequence(example) -> tuple[list[int], list[int]]:
    """input ids and labels; a preference pair shows its chosen reply."""
    chosen = getattr(example, "chosen", None)
    return (chosen.input_ids, chosen.labels) if chosen is not None else (example.input_ids, example.labels)
