"""The new-job form -> the exact `POST /v1/fine_tuning/jobs` body, the one the portal sends and
shows (so users learn the API); and the API's error -> the form field it belongs to."""

from __future__ import annotations

from typing import Any, Literal

# The form's method choice -> (OpenAI method.type, phitune method.name).
METHODS: dict[str, tuple[Literal["supervised", "dpo"], str]] = {
    "lora": ("supervised", "lora"),
    "qlora": ("supervised", "qlora"),
    "dora": ("supervised", "dora"),
    "full": ("supervised", "full"),
    "dpo": ("dpo", "lora"),
}
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier", "beta")
FIELDS = ("model", "training_file", "validation_file", "method", "suffix", "seed", "metadata", *HYPERPARAMETERS)


def _number(text: str) -> Any:
    """'auto', an int or a float as typed; anything else is passed on for the API to refuse by name."""
    text = text.strip()
    if text in ("", "auto"):
        return "auto"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def metadata_of(text: str) -> dict[str, str] | str | None:
    """`key=value` lines -> a dict; a line without `=` is returned as is (the API names it)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    out = {}
    for line in lines:
        key, eq, value = line.partition("=")
        if not eq:
            return line
        out[key.strip()] = value.strip()
    return out


def job_request(form: dict[str, str]) -> dict:
    """The request body, with only what the user chose (the API fills in every `auto`)."""
    kind, name = METHODS.get(form.get("method", "lora"), (form.get("method", ""), None))
    hyper = {k: _number(form[k]) for k in HYPERPARAMETERS if k in form and _number(form[k]) != "auto"}
    if kind != "dpo":
        hyper.pop("beta", None)
    body: dict[str, Any] = {"model": form.get("model", ""), "training_file": form.get("training_file", "")}
    if form.get("validation_file"):
        body["validation_file"] = form["validation_file"]
    body["method"] = {"type": kind, kind: {"hyperparameters": hyper}} if hyper else {"type": kind}
    if form.get("suffix", "").strip():
        body["suffix"] = form["suffix"].strip()
    if form.get("seed", "").strip():
        body["seed"] = _number(form["seed"])
    metadata = metadata_of(form.get("metadata", ""))
    if metadata is not None:
        body["metadata"] = metadata
    if name and name != "lora":
        body["phitune"] = {"method": {"name": name}}
    return body


def field_of(param: str | None) -> str:
    """The form field an API error's `param` names (`method.supervised.hyperparameters.n_epochs` ->
    `n_epochs`); errors of no field go to the form's own error line."""
    if not param:
        return "form"
    last = param.split(".")[-1]
    if last in FIELDS:
        return last
    if param.startswith("metadata"):
        return "metadata"
    if param.startswith(("phitune", "method")):
        return "method"
    return "form"
