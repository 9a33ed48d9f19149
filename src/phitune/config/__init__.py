"""The one typed, strict configuration shared by the CLI, YAML files and (later) the HTTP API.

`load_config(path, overrides)` returns a `Config` or raises one `PhituneError` that lists every
problem at once: unknown keys (with the closest valid key), wrong types, bad values, missing
files. Field descriptions double as the reference documentation (`phitune config-reference`).
"""

from phitune.config.checks import EVAL_METRICS, semantic_problems
from phitune.config.loading import apply_overrides, load_config, parse_config
from phitune.config.reference import applicable, dump_config, flatten, reference_markdown
from phitune.config.schema import (
    _SECTIONS,
    Config,
    DataConfig,
    DistributedConfig,
    DtypeName,
    MethodConfig,
    ModelConfig,
    TaskConfig,
    TrainingConfig,
    looks_local,
    template_fields,
)

__all__ = [
    "EVAL_METRICS",
    "_SECTIONS",
    "Config",
    "DataConfig",
    "DistributedConfig",
    "DtypeName",
    "MethodConfig",
    "ModelConfig",
    "TaskConfig",
    "TrainingConfig",
    "apply_overrides",
    "dump_config",
    "flatten",
    "applicable",
    "load_config",
    "looks_local",
    "parse_config",
    "reference_markdown",
    "semantic_problems",
    "template_fields",
]
