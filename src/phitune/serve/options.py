"""The job options a tenant may set (`extra_body={"phitune": {...}}`): an explicit allow-list over
the training config, declared as pydantic models built from the config's own fields (same types,
defaults and descriptions, tighter bounds). Everything else in the config belongs to the server:
which model and code run, every path, how a job is scheduled. Asking for one of those is a 400
that names the key and says who sets it.

`classify(path)` answers for any config key, so a test can walk the whole config schema and fail
when a new field is neither allowed nor owned."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Optional, Union, get_args, get_origin

from annotated_types import Le
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from phitune.config import _SECTIONS
from phitune.methods import METHOD_FIELDS

# key path (a section or one key) -> who sets it instead
SERVER_OWNED: dict[str, str] = {
    "model": "the job's `model` names a served model; its path, tokenizer, revision, dtype, attention kernel and "
    "remote-code trust are the server's",
    "distributed": "the server decides where and how a job runs",
    "output_dir": "the server writes each job to its own run directory",
    "data.train": "use `training_file` (a file id of your organization)",
    "data.validation": "use `validation_file` (a file id of your organization)",
    "method.objective": "use method.type (supervised or dpo)",
    "method.beta": "use method.dpo.hyperparameters.beta",
    "training.epochs": "use hyperparameters.n_epochs",
    "training.max_steps": "a job's length is hyperparameters.n_epochs",
    "training.batch_size": "use hyperparameters.batch_size",
    "training.seed": "use `seed`",
    "training.log_every": "the service logs every step (one metrics event each)",
    "training.save_every": "the service checkpoints every 10 steps",
    "training.save_total_limit": "the service keeps a job's newest checkpoints (the server's --keep-checkpoints, "
    "default 3) and its best",
    "training.tensorboard": "the service reports metrics as job events",
    "training.compile": "the server decides (auto: compiled when a job is long enough to repay it)",
}

TENANT: dict[str, tuple[str, ...]] = {
    # Every method's own keys (methods/), less the server-owned ones above.
    "method": tuple(key for key in METHOD_FIELDS if f"method.{key}" not in SERVER_OWNED),
    "data": (
        "format",
        "template",
        "completion_field",
        "chat_template",
        "system",
        "max_length",
        "max_dropped",
        "packing",
        "group_by_length",
        "validation_split",
        "subset",
        "dedupe",
    ),
    "task": ("name", "head", "labels", "instruction", "source_language", "target_language", "fields"),
    "training": (
        "learning_rate",
        "gradient_accumulation_steps",
        "lr_scheduler",
        "warmup_steps",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
        "optimizer",
        "precision",
        "gradient_checkpointing",
        "eval_every",
        "early_stopping_patience",
        "eval_generate",
        "best_metric",
        "keep_best",
    ),
}

# Upper bounds where the config has none (a finite number can still overflow float32 or memory).
LIMITS: dict[str, float] = {
    "method.r": 1024,
    "method.alpha": 1e4,
    "method.num_virtual_tokens": 1024,
    "data.max_length": 32768,
    "training.learning_rate": 1.0,
    "training.gradient_accumulation_steps": 256,
    "training.warmup_steps": 10**6,
    "training.weight_decay": 10.0,
    "training.max_grad_norm": 1e6,
    "training.eval_every": 10**6,
    "training.early_stopping_patience": 1000,
    "training.eval_generate": 10_000,
}
TEXT_LIMIT = 4096  # characters of a free-text option (system message, instruction, template)


def classify(path: str) -> str:
    """'tenant', 'server' or 'unclassified' for a dotted config key path."""
    section, _, key = path.partition(".")
    if key in TENANT.get(section, ()):
        return "tenant"
    if path in SERVER_OWNED or section in SERVER_OWNED:
        return "server"
    return "unclassified"


def _bounded(annotation, limit: float | None):
    """`annotation` with `<= limit` on its number (inside Optional), and text kept short."""
    if get_origin(annotation) is Union:
        return Union[tuple(_bounded(a, limit) for a in get_args(annotation))]
    if annotation in (int, float) and limit is not None:
        return Annotated[annotation, Le(limit)]
    if get_origin(annotation) is Annotated and get_args(annotation)[0] in (int, float) and limit is not None:
        return Annotated[annotation, Le(limit)]  # PositiveFloat and the like: their own bound, and this one
    if annotation is str:
        return Annotated[str, Field(max_length=TEXT_LIMIT)]
    return annotation


def _refuse_keys(section: str, allowed: tuple[str, ...]):
    """A before-validator for `section` ("" for the top level): a key the server owns, or one the
    allow-list does not have, is refused by its full name."""
    kind = "option" if section else "section"

    def check(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key in value:
                path = f"{section}.{key}" if section else str(key)
                if classify(path) == "server":
                    inner = value[key]  # name the exact key: phitune.model.tokenizer, not phitune.model
                    shown = f"{path}.{next(iter(inner))}" if not section and isinstance(inner, dict) and inner else path
                    raise ValueError(
                        f"phitune.{shown} is set by the server, not by a job: "
                        f"{SERVER_OWNED.get(path) or SERVER_OWNED[path.split('.')[0]]}"
                    )
                if key not in allowed:
                    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
                    raise ValueError(
                        f"phitune.{path}: unknown {kind}"
                        + (f"; did you mean '{close[0]}'?" if close else f"; a job may set {', '.join(allowed)}")
                    )
        return value

    return model_validator(mode="before")(classmethod(check))  # type: ignore[arg-type]  # built per section


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _section_model(section: str) -> type[BaseModel]:
    config_model = _SECTIONS[section]
    fields = {}
    for name in TENANT[section]:
        info = config_model.model_fields[name]
        annotation = _bounded(info.annotation, LIMITS.get(f"{section}.{name}"))
        fields[name] = (annotation, Field(info.default, description=info.description, **_metadata(info)))
    return create_model(  # type: ignore[call-overload]  # fields built from the config's
        f"{section.title()}Options",
        __base__=_Options,
        __doc__=f"The {section} options a job may set.",
        __validators__={"server_keys": _refuse_keys(section, TENANT[section])},
        **fields,
    )


def _metadata(info) -> dict:
    """The config field's own bounds (gt, ge, lt, le) carried over."""
    out = {}
    for item in info.metadata:
        for bound in ("gt", "ge", "lt", "le"):
            if getattr(item, bound, None) is not None:
                out[bound] = getattr(item, bound)
    return out


_MODELS = {section: _section_model(section) for section in TENANT}


JobOptions: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "JobOptions",
    __base__=_Options,
    __doc__="phitune options (`extra_body={'phitune': {...}}`): the part of the training config a job may set.",
    __validators__={"server_keys": _refuse_keys("", tuple(TENANT))},
    **{section: (Optional[model], None) for section, model in _MODELS.items()},
)


def tenant_options(raw: Any) -> dict:
    """A job's stored options checked again (rows written before the allow-list, or by hand):
    only the keys a tenant may set, as given. Raises pydantic's ValidationError."""
    return JobOptions.model_validate(raw or {}).model_dump(exclude_unset=True)


def allowed_keys() -> list[str]:
    return [f"{section}.{key}" for section, keys in TENANT.items() for key in keys]
