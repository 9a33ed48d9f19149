"""/v1/fine_tuning/jobs/{job_id}/gguf (a phitune extension of the OpenAI API): a fine-tuned model
as one GGUF file for llama.cpp, Ollama and LM Studio.

Built once per job and quantization by `phitune export gguf` in a child process (an API process
never loads torch), one build at a time per API process, and kept in the job's run directory:
it counts in the organization's storage quota and goes with the model when the model is deleted.
A client that leaves while its file is built costs only that build, which the next one downloads.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from phitune.errors import last_line
from phitune.export.gguf import QUANTIZED, WRITTEN
from phitune.serve import schemas, storage
from phitune.serve.deps import Org, Reads
from phitune.serve.errors import ApiError
from phitune.serve.routes.chat import resolve
from phitune.serve.routes.jobs import get_job

log = logging.getLogger("phitune.serve")
router = APIRouter(tags=["fine-tuning"])
# Builds run in a worker thread (whatever event loop asked): one per file, whoever asks, and one
# at a time in this process, since a build takes the CPU for seconds to minutes.
_BUILDS: dict[str, threading.Lock] = {}
_BUILDS_LOCK = threading.Lock()
_ONE_AT_A_TIME = threading.Lock()


def served_quants() -> tuple[str, ...]:
    """What this server can build: the writer's quantizations, and llama.cpp's where it is installed."""
    return WRITTEN + (QUANTIZED if importlib.util.find_spec("llama_cpp") else ())


@router.get(
    "/fine_tuning/jobs/{job_id}/gguf",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "the fine-tuned model (adapter merged) as a GGUF file; built on the first request "
            "for a quantization (seconds to minutes), then served from the job's storage",
        },
        **schemas.errors(400, 401, 403, 404, 500),
    },
)
async def job_gguf(
    request: Request,
    org: Org,
    reads: Reads,
    job_id: str,
    quant: str = Query(
        "q8_0",
        description="f32, f16, bf16, q8_0; and q4_k_m, q5_k_m, ... where the server has llama.cpp's quantizer",
    ),
) -> FileResponse:
    allowed = served_quants()
    if quant not in allowed:
        raise ApiError(400, f"quant '{quant}': this server builds {', '.join(allowed)}", param="quant")
    with reads() as db:
        job = get_job(db, org, job_id)
    if job.status != "succeeded" or job.model_deleted or not job.fine_tuned_model:
        state = "its model was deleted" if job.model_deleted else f"it is {job.status}"
        raise ApiError(400, f"fine-tuning job {job_id} has no fine-tuned model to export ({state})")
    settings = request.app.state.settings
    path = settings.run_dir(job.id) / "gguf" / f"{quant}.gguf"
    if not path.is_file():
        await anyio.to_thread.run_sync(storage.room, settings, reads, org, "GGUF export")  # walks the disk
        base, adapter, _ = resolve(request, org, job.fine_tuned_model)  # the weights chat serves
        await anyio.to_thread.run_sync(_build, settings, job, quant, path, base, adapter)
    name = job.fine_tuned_model.replace(":", "-").replace("/", "-")
    return FileResponse(path, media_type="application/octet-stream", filename=f"{name}-{quant}.gguf")


def _build(settings, job, quant: str, path: Path, base: str, adapter: str | None) -> None:
    with _BUILDS_LOCK:
        lock = _BUILDS.setdefault(str(path), threading.Lock())
    with lock, _ONE_AT_A_TIME:
        if path.is_file():  # built while this request waited
            return
        run = settings.run_dir(job.id)
        work = path.parent / f".build-{quant}-{os.getpid()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "phitune", "export", "gguf", adapter or base, "--output", str(work)]
        command += ["--quant", quant, "--overwrite", "--name", job.fine_tuned_model]
        if adapter:
            command += ["--base", base]
        proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
        try:
            if proc.returncode != 0:
                raise _failure(proc.returncode, proc.stderr, job, run, settings)
            os.replace(work / "model.gguf", path)
        except FileNotFoundError:  # the model was deleted (its run's gguf/ with it) while this built
            raise ApiError(400, f"{job.fine_tuned_model} was deleted while its GGUF file was built") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _failure(code: int, stderr: str, job, run: Path, settings) -> ApiError:
    """The export's own one-line reason (exit 2: the model cannot be exported as asked), with the
    server's paths replaced by the names the caller knows."""
    reason = last_line(stderr).removeprefix("phitune: error: ")
    for where, shown in ((str(run), job.fine_tuned_model), (settings.models.get(job.model, ""), job.model)):
        if where:
            reason = reason.replace(where, shown)
    if code == 2:
        return ApiError(400, f"{job.fine_tuned_model} cannot be exported as GGUF: {reason}")
    log.error("GGUF export of %s (job %s) failed: %s", job.fine_tuned_model, job.id, stderr[-2000:])
    return ApiError(500, f"the GGUF export of {job.fine_tuned_model} failed; the server's log has the reason")
