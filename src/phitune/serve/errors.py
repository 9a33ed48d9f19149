"""OpenAI's error shape: HTTP status + {"error": {message, type, param, code}}. The SDK picks its
exception by status and retries 408/409/429/5xx, so a request that can never succeed is a 4xx."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastapi import HTTPException

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
}


class ApiError(HTTPException):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.param, self.code = param, code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.detail,
                "type": TYPES.get(self.status_code, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def not_found(kind: str, ident: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No {kind} found with id '{ident}'.", param=param, code=f"{kind.replace(' ', '_')}_not_found")


# Where pydantic's error locations name a branch of a union or a validator, not a key.
_BRANCH = re.compile(
    r"^(literal\[|function-|constrained-|tagged-union|list\[|dict\[|union\[|json-or-python|lax-or-strict)"
    r"|^(float|int|str|bool|none|list|dict|[A-Z]\w*)$"
)


def validation_message(errors: Sequence[Any]) -> tuple[str | None, str]:
    """(param, one line) for a request that failed its schema: the first bad key (the param), its
    value and every way it could have been right ("'auto' or a number <= 100"), then each other
    bad key the same way, once each."""
    if not errors:
        return None, "invalid request"
    first = errors[0]
    if first["type"] == "json_invalid" or tuple(first.get("loc", ())) == ("body",):
        if first["type"] == "missing":
            return None, "the request body is missing: send a JSON object"
        return None, "the request body must be a JSON object"
    groups: dict[str, list[dict]] = {}
    for err in errors:
        groups.setdefault(_path(err), []).append(err)
    said = [_key_message(key, same) for key, same in groups.items()]
    return said[0][0], "; ".join(dict.fromkeys(message for _, message in said))


def _path(err: dict) -> str:
    parts = [p for p in err.get("loc", ())[1:] if isinstance(p, int) or not _BRANCH.match(str(p))]
    return ".".join(str(p) for p in parts)


def _key_message(param: str, same: list[dict]) -> tuple[str | None, str]:
    first = same[0]
    reasons = list(dict.fromkeys(_reason(e) for e in same))
    own = re.match(r"(phitune\.[\w.]+)[ :]", reasons[0])
    if first["type"] == "value_error" and own:  # the options allow-list names the exact key itself
        return own.group(1), reasons[0]
    if first["type"] == "extra_forbidden":
        hint = "; phitune's own options go in extra_body {'phitune': {...}}" if "." not in param else ""
        return param, f"{param}: unknown parameter{hint}"
    if first["type"] == "missing":
        return param, f"{param}: required"
    value = first.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" {value!r}:"
    return param or None, f"{param or 'body'}:{shown} {' or '.join(reasons)}"


def _reason(err: dict) -> str:
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return "must be an object"
    msg = err["msg"].removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]
