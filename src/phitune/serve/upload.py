"""A multipart upload read as it arrives: the file part goes straight to its final path, bytes are
counted, and the request is refused the moment the file passes the limit. Nothing larger than the
limit is ever written, in storage or in a temporary file (Starlette's form parser spools the whole
body first, and only then could the size be checked)."""

from __future__ import annotations

import re
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from phitune.serve.errors import ApiError

FIELD_LIMIT = 1024  # bytes of a plain form field (purpose)
MAX_PARTS = 8  # parts of one upload (the form has two): a flood of small fields is refused early
FORM_SLACK = 64 * 1024  # multipart headers and plain fields around the file, for the Content-Length check
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Upload:
    """The parsed form: `fields` (plain values) and the file written to `path` (`size`, `filename`)."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path, self.limit = path, limit
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = self.parts = 0
        self._out = None
        self._headers: dict[str, str] = {}
        self._field, self._value, self._name = b"", b"", None

    # --- parser callbacks ---------------------------------------------------------------------

    def _header_field(self, data, start, end) -> None:
        self._field += data[start:end]

    def _header_value(self, data, start, end) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field, self._value = b"", b""

    def _headers_finished(self):
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise ApiError(400, f"multipart body: more than {MAX_PARTS} parts; send `file` and `purpose` only")
        _, params = parse_options_header(self._headers.get("content-disposition", ""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in params:
            if self._name != "file":
                raise ApiError(
                    400, f"multipart field {self._name!r}: only the field `file` carries the upload", param="file"
                )
            if self._out is not None:
                raise ApiError(400, "multipart body: one file per upload", param="file")
            self.filename = params[b"filename"].decode("utf-8", "replace")
            self._out = self.path.open("wb")
        else:
            self.fields[self._name] = ""

    def _part_data(self, data, start, end):
        chunk = data[start:end]
        if self._name == "file" and self._out is not None and not self._out.closed:
            self.size += len(chunk)
            if self.size > self.limit:
                raise ApiError(
                    413,
                    f"file: larger than this server's limit of {self.limit} bytes",
                    param="file",
                    code="file_too_large",
                )
            self._out.write(chunk)
            return
        value = self.fields.get(self._name, "") + chunk.decode("utf-8", "replace")
        if len(value) > FIELD_LIMIT:
            raise ApiError(400, f"{self._name}: a form field of at most {FIELD_LIMIT} bytes", param=self._name)
        self.fields[self._name] = value

    def _part_end(self) -> None:
        if self._out is not None and not self._out.closed:
            self._out.close()
        self._headers = {}

    # --- reading ------------------------------------------------------------------------------

    async def read(self, request: Request) -> "Upload":
        """Parse the request body into this upload; on any error the partial file is removed."""
        kind, params = parse_options_header(request.headers.get("content-type", ""))
        if kind != b"multipart/form-data" or not params.get(b"boundary"):
            raise ApiError(400, "the upload must be multipart/form-data with `file` and `purpose` fields")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.limit + FORM_SLACK:
            raise ApiError(
                413,
                f"file: larger than this server's limit of {self.limit} bytes (Content-Length {length})",
                param="file",
                code="file_too_large",
            )
        parser = MultipartParser(
            params[b"boundary"],
            {
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
            },
        )
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
            if self._out is None:
                raise ApiError(400, "file: required (a multipart file field named `file`)", param="file")
            if not self._out.closed:
                raise ApiError(400, "multipart body: the file part is incomplete")
        except BaseException as exc:
            if self._out is not None:
                self._out.close()
            self.path.unlink(missing_ok=True)
            if isinstance(exc, ValueError):  # python-multipart's own complaint about the body
                raise ApiError(400, f"multipart body: {exc}") from None
            raise
        return self

    def shown_name(self) -> str:
        """The uploaded name as shown back: its last path component, control characters replaced."""
        name = (self.filename or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
        return _CONTROL.sub("_", name)[:255] or "upload.jsonl"
