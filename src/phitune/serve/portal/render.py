"""The portal's Jinja2 environment: autoescaping on for every template (a tenant's text, a file's
`<script>`, is always shown as text), and the few filters the templates share."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

HERE = Path(__file__).parent
STATIC = HERE / "static"


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts)) if ts else ""


def _number(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


ENV = Environment(
    loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined, trim_blocks=True
)
ENV.filters.update(when=_when, number=_number, tojson_pretty=lambda v: json.dumps(v, indent=2))


def html(template: str, status: int = 200, headers: dict | None = None, **context) -> HTMLResponse:
    return HTMLResponse(ENV.get_template(template).render(**context), status_code=status, headers=headers)
