"""The fine-tuning methods: one module each (`lora.py` holds LoRA, DoRA and QLoRA), each with its
own settings. `MethodConfig` (the config's `method:` section) is the union of those settings,
chosen by `name`: `{name: ia3, r: 64}` is refused because IA3's settings have no `r`.

Adding a method: a module defining its settings (a `MethodSettings` with `name: Literal[...]`), a
builder and a `Method`; then one line in `METHODS` and one in `MethodConfig` below.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Tag, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from phitune.methods import full, ia3, lora, prompt_tuning
from phitune.methods.base import BuildContext, Method, MethodSettings
from phitune.methods.full import FullSettings
from phitune.methods.ia3 import IA3Settings
from phitune.methods.lora import DoraSettings, LoraSettings, QLoraSettings
from phitune.methods.prompt_tuning import PromptTuningSettings

METHODS: dict[str, Method] = {
    m.name: m for m in (full.METHOD, lora.LORA, lora.DORA, lora.QLORA, ia3.METHOD, prompt_tuning.METHOD)
}
METHOD_NAMES = tuple(METHODS)
DEFAULT_METHOD = "lora"


def _method_name(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("name", DEFAULT_METHOD)
    return getattr(value, "name", None)


MethodConfig = Annotated[
    Union[
        Annotated[FullSettings, Tag("full")],
        Annotated[LoraSettings, Tag("lora")],
        Annotated[DoraSettings, Tag("dora")],
        Annotated[QLoraSettings, Tag("qlora")],
        Annotated[IA3Settings, Tag("ia3")],
        Annotated[PromptTuningSettings, Tag("prompt_tuning")],
    ],
    Discriminator(_method_name),
]


def _all_fields() -> dict[str, FieldInfo]:
    """Every key of any method (the first method's field where several read it), `name` first."""
    out: dict[str, FieldInfo] = {
        "name": FieldInfo(
            default=DEFAULT_METHOD,
            annotation=Literal[METHOD_NAMES],  # type: ignore[valid-type,arg-type]  # the names above, at run time
            description="Fine-tuning method: " + ", ".join(METHODS) + ".",
        )
    }
    for method in METHODS.values():
        for key, info in method.settings.model_fields.items():
            out.setdefault(key, info)
    return out


# The `method:` keys, each as one field (the config reference, the service's allow-list, flags).
METHOD_FIELDS = _all_fields()
# Which methods read each key (name, objective and beta: every one).
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    key: tuple(name for name, m in METHODS.items() if key in m.settings.model_fields) for key in METHOD_FIELDS
}
METHOD_KEYS["name"] = METHOD_NAMES


def foreign_key(name: str, key: str) -> str | None:
    """Why method `name` refuses `key` when another method reads it, else None (an unknown key)."""
    users = METHOD_KEYS.get(key, ())
    if not users or name in users:
        return None
    return (
        f"not read by method {name}; it applies to {', '.join(users)} (remove it, or set method.name to one of those)"
    )


def without_foreign_defaults(value: Any) -> Any:
    """A `method:` mapping without the other methods' keys that sit at their defaults: a run's
    config.yaml written whole (before each method had its own keys) loads as it did."""
    if not isinstance(value, dict) or value.get("name", DEFAULT_METHOD) not in METHODS:
        return value
    own = METHODS[value.get("name", DEFAULT_METHOD)].settings.model_fields
    return {k: v for k, v in value.items() if k in own or k not in METHOD_FIELDS or v != METHOD_FIELDS[k].default}


_SETTINGS: TypeAdapter = TypeAdapter(MethodConfig)


def validate_settings(value: Any) -> MethodSettings:
    """The settings of the method `value["name"]` names. With a name no method has, every other
    key is still checked against its field, so that one pass reports every problem."""
    value = without_foreign_defaults(value)
    name = _method_name(value)
    if not isinstance(value, dict) or name in METHODS:
        return _SETTINGS.validate_python(value)
    errors: list[Any] = []
    try:
        _SETTINGS.validate_python({"name": name})
    except ValidationError as exc:
        errors += exc.errors()
    for key, item in value.items():
        if key == "name" or key not in METHOD_FIELDS:
            continue
        info = METHOD_FIELDS[key]
        try:
            TypeAdapter(Annotated[info.annotation, info]).validate_python(item)  # type: ignore[arg-type]
        except ValidationError as exc:
            errors += [{**e, "loc": (key, *e["loc"])} for e in exc.errors()]
    raise ValidationError.from_exception_data("method", errors)


__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "METHOD_FIELDS",
    "METHOD_KEYS",
    "METHOD_NAMES",
    "BuildContext",
    "Method",
    "MethodConfig",
    "MethodSettings",
    "foreign_key",
    "validate_settings",
    "without_foreign_defaults",
]
