"""OpenAI's error shape: HTTP status + {"error": {message, type, param, code}}. The SDK picks its
exception by status and retries 408/409/429/5xx, so a request that can never succeed is a 4xx."""

from __future__ import annotations

from fastapi import HTTPException

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         413: "invalid_request_error", 422: "invalid_request_error"}


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(status_code=status, detail=message)
        self.param, self.code = param, code

    def body(self) -> dict:
        return {"error": {"message": self.detail, "type": TYPES.get(self.status_code, "server_error"),
                          "param": self.param, "code": self.code}}


def not_found(kind: str, ident: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No {kind} found with id '{ident}'.", param=param, code=f"{kind.replace(' ', '_')}_not_found")
