"""Request and response bodies of the API (OpenAI's shapes), separate from the tables. Requests
are strict: a wrong type or an unknown key is a 400 naming it, never a 500; numbers are finite and
in range. `/openapi.json` is built from these."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from phitune.serve.options import JobOptions
from phitune.serve.status import ALL as STATUSES


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


Auto = Literal["auto"]
Epochs = Union[Auto, Annotated[int, Field(ge=1, le=50)]]
BatchSize = Union[Auto, Annotated[int, Field(ge=1, le=256)]]
LrMultiplier = Union[Auto, Annotated[float, Field(gt=0, le=100)]]
Beta = Union[Auto, Annotated[float, Field(gt=0, le=2)]]
Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class SupervisedHyperparameters(_Request):
    n_epochs: Epochs = "auto"
    batch_size: BatchSize = "auto"
    learning_rate_multiplier: LrMultiplier = "auto"


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Beta = "auto"


class Supervised(_Request):
    hyperparameters: Optional[SupervisedHyperparameters] = None


class Dpo(_Request):
    hyperparameters: Optional[DpoHyperparameters] = None


class Method(_Request):
    type: Literal["supervised", "dpo"] = Field(
        description="supervised (SFT) or dpo (preference pairs); reinforcement is not run by this server."
    )
    supervised: Optional[Supervised] = None
    dpo: Optional[Dpo] = None


Suffix = Annotated[str, StringConstraints(max_length=64, pattern=r"^[^/:]*$")]
MetaKey = Annotated[str, StringConstraints(max_length=64)]
MetaValue = Annotated[str, StringConstraints(max_length=512)]


class JobCreate(_Request):
    """POST /v1/fine_tuning/jobs. phitune's own options go in `phitune` (the SDK's extra_body)."""

    model: Id = Field(description="A base model served here (GET /v1/models lists them).")
    training_file: Id = Field(description="A file id of your organization, purpose fine-tune.")
    validation_file: Optional[Id] = None
    suffix: Optional[Suffix] = None
    seed: Optional[Annotated[int, Field(ge=0, le=2**31 - 1)]] = None
    metadata: Optional[Annotated[dict[MetaKey, MetaValue], Field(max_length=16)]] = None
    method: Optional[Method] = None
    hyperparameters: Optional[DpoHyperparameters] = Field(None, description="Deprecated by OpenAI: use method.")
    integrations: Optional[Annotated[list[Any], Field(max_length=0)]] = Field(
        None, description="Not supported here (an empty list is accepted)."
    )
    phitune: Optional[JobOptions] = None  # type: ignore[valid-type]


Role = Literal["system", "user", "assistant", "developer"]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Role
    content: str


Stop = Union[
    Annotated[str, StringConstraints(min_length=1)],
    Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(max_length=4)],
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False  # a last chunk with `usage` and no choices, as OpenAI sends


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. Other OpenAI parameters (user, presence_penalty, ...) are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    model: Id
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Optional[Annotated[int, Field(ge=1, le=4096)]] = None
    max_completion_tokens: Optional[Annotated[int, Field(ge=1, le=4096)]] = None
    temperature: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    top_p: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    n: Optional[Literal[1]] = None
    stop: Optional[Stop] = None
    seed: Optional[Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]] = None  # int64, what torch's seed takes
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None


# --- responses ---------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: Optional[str] = None
    expires_at: Optional[int] = None


class Problem(BaseModel):
    line: Optional[int] = None
    message: str


class Segment(BaseModel):
    text: str
    trained: bool


class PreviewExample(BaseModel):
    line: Optional[int] = None
    tokens: int
    trained_tokens: int
    segments: list[Segment]


class FileCheck(BaseModel):
    """phitune's extension: a file as a job on `model` reads it."""

    object: Literal["file.check"]
    file_id: str
    model: str
    checked_bytes: int
    sampled: bool  # true: a large file, checked on its first checked_bytes (whole lines)
    format: str
    examples: int
    valid: bool
    errors: list[Problem]
    errors_total: int
    warnings: list[str]
    preview: list[PreviewExample]


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool


class _Page(BaseModel):
    object: Literal["list"]
    has_more: bool
    first_id: Optional[str] = None
    last_id: Optional[str] = None


class FileList(_Page):
    data: list[FileObject]


class JobError(BaseModel):
    code: Optional[str] = None
    message: Optional[str] = None
    param: Optional[str] = None


class Hyperparameters(BaseModel):
    n_epochs: Union[Auto, int]
    batch_size: Union[Auto, int]
    learning_rate_multiplier: Union[Auto, float]
    beta: Optional[Union[Auto, float]] = None


class MethodOut(BaseModel):
    type: str
    supervised: Optional[dict[str, Hyperparameters]] = None
    dpo: Optional[dict[str, Hyperparameters]] = None


class Job(BaseModel):
    id: str
    object: Literal["fine_tuning.job"]
    created_at: int
    error: Optional[JobError] = None
    fine_tuned_model: Optional[str] = None
    finished_at: Optional[int] = None
    hyperparameters: Hyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: Literal[STATUSES]  # type: ignore[valid-type]  # serve/status.ALL, read at run time
    trained_tokens: Optional[int] = None
    training_file: str
    validation_file: Optional[str] = None
    estimated_finish: Optional[int] = None
    integrations: list[Any]
    metadata: Optional[dict[str, str]] = None
    method: MethodOut
    user_provided_suffix: Optional[str] = None


class JobList(_Page):
    data: list[Job]


class Event(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: str
    message: str
    type: str
    data: Optional[dict[str, Any]] = None


class EventList(_Page):
    data: list[Event]


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class CheckpointList(_Page):
    data: list[Checkpoint]


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


def documented(model: type[BaseModel], *codes: int, description: str = "success") -> dict:
    """A route's keyword arguments: its 200 body and error statuses in /openapi.json. Documented,
    not enforced per response (schemathesis and the SDK tests check the bodies): the route still
    returns a plain dict, which FastAPI serialises in pydantic-core as `response_model=dict`
    (with no response model it falls back to jsonable_encoder, 1.6x slower under load)."""
    return {"response_model": dict, "responses": {200: {"model": model, "description": description}, **errors(*codes)}}


def errors(*codes: int) -> dict:
    """The `responses=` of a route: its error statuses, each with OpenAI's error body."""
    meaning = {
        400: "invalid request",
        401: "missing or wrong API key",
        403: "your organization's storage quota is used up",
        404: "no such object in your organization",
        413: "upload larger than the server's limit",
        500: "the server failed (a model that did not load, an export that failed); its log has the reason",
    }
    return {code: {"model": ErrorResponse, "description": meaning[code]} for code in codes}
