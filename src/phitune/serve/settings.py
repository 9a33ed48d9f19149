"""What a server or worker needs to know: where the database and files live, which base models
it serves, the limits. One object, built from the command line."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path

from phitune.errors import PhituneError


@dataclass
class Settings:
    storage: Path
    db_url: str = ""
    models: dict[str, str] = field(default_factory=dict)  # served base model id -> local path or hub id
    trusted: list[str] = field(default_factory=list)  # served model ids whose own modelling code may run
    max_upload_bytes: int = 512 * 2**20
    max_request_bytes: int = 8 * 2**20  # any other request body (chat, jobs, forms)
    allowed_hosts: list[str] = field(default_factory=list)  # Host names a keyless server answers to
    max_connections: int = 1000  # per API process; more are answered 503
    read_timeout: float = 30.0  # seconds a request body may pause between chunks
    org_quota_bytes: int | None = None  # files and runs one organization may store; None: no quota
    keep_checkpoints: int = 3  # a service job's newest checkpoints kept (and its best, with validation); 0: all
    poll_seconds: float = 0.5  # how often a worker looks for work and at its running job
    stale_seconds: float = 30.0  # a running job whose worker sent no heartbeat for this long is re-queued
    open_when_keyless: bool = True  # with no API key, let anyone in as `local`: loopback servers only
    engine_socket: str = ""  # the engine process the supervisor started; "": the app starts its own
    engine: dict = field(default_factory=dict)  # inference.engine.Limits fields (--max-batch, --kv-cache-mb, ...)
    engine_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.storage = Path(self.storage)
        self.db_url = self.db_url or f"sqlite:///{self.storage / 'phitune.db'}"

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "storage": str(self.storage)})

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        return cls(**json.loads(text))

    @property
    def files_dir(self) -> Path:
        return self.storage / "files"

    def file_path(self, file_id: str, purpose: str = "fine-tune") -> Path:
        """Where a file's bytes live: named by id (never by the uploaded name); fine-tuning data is
        JSONL (the extension tells phitune's reader the format)."""
        return self.files_dir / (file_id + (".csv" if purpose == "fine-tune-results" else ".jsonl"))

    @property
    def jobs_dir(self) -> Path:
        return self.storage / "jobs"

    def job_dir(self, job_id: str) -> Path:
        """A job's config.yaml and train.log; its training output is run_dir."""
        return self.jobs_dir / job_id

    def run_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "run"


def parse_models(specs: list[str] | None) -> dict[str, str]:
    """`--model NAME=PATH` (repeatable); a bare PATH is served under its directory name."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, eq, path = spec.partition("=")
        if not eq:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or "/" in name or name.startswith("ft:"):
            raise PhituneError(
                f"--model {spec}: the model id must be a plain name (no '/', not ft:...), e.g. phi3=models/phi3"
            )
        out[name] = path
    return out


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
