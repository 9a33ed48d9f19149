"""The worker: claims jobs from the database and runs the training recipe in a subprocess.

Claiming is one conditional UPDATE (`... WHERE id = ? AND status = ?`): of several workers on one
database exactly one gets each job. A running job has a heartbeat; a job whose worker vanished
(SIGKILL, a lost machine) goes back to the queue and continues from its last checkpoint
(`phitune train --auto-resume`). While the subprocess runs, its metrics.jsonl becomes metric
events (one per step, never twice) and its checkpoints become checkpoint objects; cancel and
pause stop it within a poll interval.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from phitune.config import dump_config
from phitune.errors import PhituneError
from phitune.outputs import checkpoint_step, list_checkpoints
from phitune.serve import status, store
from phitune.serve.db import Checkpoint, File, Job, add_event, new_id, now
from phitune.serve.jobconfig import build_config, choose_hyperparameters, fine_tuned_name
from phitune.serve.settings import Settings
from phitune.serve.status import Status
from phitune.serve.storage import quota_error, usage
from phitune.training.tracking import read_metrics

log = logging.getLogger("phitune")
PAUSED = "The job was paused; resume continues from its last checkpoint"
QUOTA = "quota"  # the organization's storage quota stopped the run (a request of the worker's own)
STOPPED = "The worker running this job stopped; it was re-queued and continues from its last checkpoint"


class Worker:
    def __init__(self, settings: Settings, sessions, name: str | None = None) -> None:
        self.settings, self.sessions = settings, sessions
        self.name = f"{name or 'worker'}@{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"

    # --- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Training jobs one at a time; file validation on a lane of its own, so a broken file
        fails in seconds even while a long job trains."""
        lane = threading.Thread(
            target=self._loop, args=(stop, self.validate_next), daemon=True, name="phitune-validate"
        )
        lane.start()
        self._loop(stop, lambda: self.step(stop, validate=False))
        lane.join(timeout=30)

    def _loop(self, stop: threading.Event, work) -> None:
        while not stop.is_set():
            try:
                busy = work()
            except Exception:  # noqa: BLE001 - a worker outlives one bad job; the job records why
                log.exception("worker step failed")
                busy = False
            if not busy:
                stop.wait(self.settings.poll_seconds)

    def validate_next(self) -> bool:
        job = self.claim(Status.VALIDATING, Status.VALIDATING)
        if job is None:
            return False
        self.validate(job)
        return True

    def step(self, stop: threading.Event | None = None, *, validate: bool = True) -> bool:
        """One unit of work: re-queue stale jobs, then validate one job's files (unless the
        validation lane does that) or run one queued job to its end."""
        self.requeue_stale()
        if validate and self.validate_next():
            return True
        job = self.claim(Status.QUEUED, Status.RUNNING)
        if job is not None:
            try:
                self.execute(job, stop)
            except Exception as exc:  # noqa: BLE001 - whatever went wrong, the job ends failed with the reason
                log.exception("job %s failed in the worker", job.id)
                reason = exc.one_line() if isinstance(exc, PhituneError) else f"{type(exc).__name__}: {exc}"
                self.finish(
                    job.id,
                    Status.FAILED,
                    error={"code": "training_failed", "message": reason[:500], "param": None},
                    message=f"Training failed: {reason[:500]}",
                )
            return True
        return False

    def claim(self, current: Status, to: Status) -> Job | None:
        """Take one unowned job in `current`; the conditional UPDATE makes it one worker's only."""
        with self.sessions() as db:
            return store.claim(db, current.value, to.value, self.name, time.time())

    def requeue_stale(self) -> None:
        limit = time.time() - self.settings.stale_seconds
        with self.sessions() as db:
            for job in store.stale_jobs(db, limit):
                # What the caller asked for wins over a re-queue; only this heartbeat's owner is moved.
                to, event, level = Status(job.status), STOPPED, "warn"
                if job.requested == status.CANCEL:
                    to, event, level = Status.CANCELLED, "The job was cancelled", "info"
                elif job.requested == status.PAUSE:
                    to, event, level = Status.PAUSED, PAUSED, "info"
                elif job.status == Status.RUNNING:
                    to = Status.QUEUED
                status.move(
                    db,
                    job.id,
                    to,
                    event=event,
                    level=level,
                    only_from=frozenset({Status(job.status)}),
                    where=(Job.heartbeat == job.heartbeat,),
                    worker=None,
                    requested=None,
                    finished_at=now() if to == Status.CANCELLED else None,
                )
            db.commit()

    def finish(self, job_id: str, to: Status, *, error: dict | None = None, message: str, **values: Any) -> bool:
        """The job's end (or pause), unless it already ended: a job cancelled meanwhile stays so."""
        with self.sessions() as db:
            moved = status.move(
                db,
                job_id,
                Status(to),
                event=message,
                level="error" if to == Status.FAILED else "info",
                error=error,
                finished_at=now() if to != Status.PAUSED else None,
                worker=None,
                requested=None,
                **values,
            )
            db.commit()
        return moved

    # --- validating_files -----------------------------------------------------------------------

    def validate(self, job: Job) -> bool | None:
        from phitune.data.dataset import read_split
        from phitune.serve.filecheck import public_text

        shown = lambda text: public_text(self.settings, text)  # noqa: E731 - file-id:line, no server path
        try:
            cfg = build_config(self.settings, job, choose_hyperparameters(job.hyperparameters, 100))
            counts = {}
            for param, file_id in (("training_file", job.training_file), ("validation_file", job.validation_file)):
                if not file_id:
                    continue
                split, _ = read_split(str(self.settings.file_path(file_id)), cfg.data, cfg.task)
                if split.errors or not split.samples:
                    problems = [shown(p) for p in split.errors[:5]] or [f"{file_id}: no examples"]
                    more = f" (and {len(split.errors) - 5} more)" if len(split.errors) > 5 else ""
                    code = "invalid_training_file" if param == "training_file" else "invalid_validation_file"
                    return self.finish(
                        job.id,
                        Status.FAILED,
                        error={"code": code, "message": "; ".join(problems) + more, "param": param},
                        message=f"{param} {file_id} is invalid: {problems[0]}",
                    )
                counts[param] = len(split.samples)
        except Exception as exc:  # noqa: BLE001 - whatever the cause, the job ends failed with it, never re-queued
            if not isinstance(exc, PhituneError):
                log.exception("job %s: validating its files failed", job.id)
            message = shown(exc.one_line() if isinstance(exc, PhituneError) else f"{type(exc).__name__}: {exc}")[:500]
            return self.finish(
                job.id,
                Status.FAILED,
                error={"code": "invalid_training_file", "message": message, "param": "training_file"},
                message=message,
            )
        chosen = choose_hyperparameters(job.hyperparameters, counts["training_file"])
        with self.sessions() as db:
            validated = (
                f"Files validated: {counts['training_file']} training examples"
                + (f", {counts['validation_file']} validation" if "validation_file" in counts else "")
                + f"; hyperparameters: {json.dumps(chosen)}"
            )
            only = frozenset({Status.VALIDATING})
            if status.move(
                db, job.id, Status.QUEUED, event=validated, only_from=only, hyperparameters=chosen, worker=None
            ):
                add_event(db, job.id, "Fine-tuning job queued")
            db.commit()
        return None

    # --- running ---------------------------------------------------------------------------------

    def execute(self, job: Job, stop: threading.Event | None) -> None:
        folder = self.settings.job_dir(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = build_config(self.settings, job, job.hyperparameters)  # checked against the server's paths again
        (folder / "config.yaml").write_text(dump_config(cfg))
        name = fine_tuned_name(job, job.org)
        with self.sessions() as db:
            add_event(db, job.id, f"Fine-tuning job started on {self.name}")
            db.commit()
        returncode, requested = self.watch(job, name, stop)
        self.conclude(job, name, returncode, requested, stopping=stop is not None and stop.is_set())

    def watch(self, job: Job, name: str, stop: threading.Event | None) -> tuple[int, str | None]:
        """Run the training process, syncing its progress until it ends or is asked to stop;
        (its exit code, the cancel / pause request that stopped it or None)."""
        folder = self.settings.job_dir(job.id)
        logf = (folder / "train.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "phitune", "train", str(folder / "config.yaml"), "--auto-resume"],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=os.getcwd(),
            start_new_session=True,
            env={**os.environ, "PHITUNE_PARENT_PID": str(os.getpid())},
        )
        requested = None
        started = time.time()
        while proc.poll() is None:
            time.sleep(self.settings.poll_seconds)
            try:
                requested = self.sync(job, name, started)
            except Exception:  # noqa: BLE001 - a database hiccup must not orphan a running job
                log.exception("job %s: syncing progress failed; retrying", job.id)
                continue
            if requested or (stop is not None and stop.is_set()):
                _terminate(proc)
                break
        proc.wait()
        logf.close()
        self.sync(job, name, started)
        return proc.returncode, requested

    def conclude(self, job: Job, name: str, returncode: int, requested: str | None, *, stopping: bool) -> bool | None:
        """The job's final status from how its training process ended."""
        if requested == QUOTA:
            used = usage(self.settings, self.sessions, job.org)
            error = quota_error(self.settings, used, f"job {job.id}")
            return self.finish(
                job.id,
                Status.FAILED,
                error={"code": error.code, "message": error.detail, "param": None},
                message=f"Training stopped: {error.detail}",
            )
        if requested == status.CANCEL:
            return self.finish(job.id, Status.CANCELLED, message="The job was cancelled")
        if requested == status.PAUSE:
            return self.finish(job.id, Status.PAUSED, message=PAUSED)
        if stopping and returncode != 0:
            # The server is shutting down: leave the job for the next worker (it resumes from a checkpoint).
            with self.sessions() as db:
                status.move(db, job.id, Status.QUEUED, only_from=frozenset({Status.RUNNING}), worker=None)
                db.commit()
            return None
        if returncode != 0:
            reason = _last_error(self.settings.job_dir(job.id) / "train.log")
            return self.finish(
                job.id,
                Status.FAILED,
                error={"code": "training_failed", "message": reason, "param": None},
                message=f"Training failed: {reason}",
            )
        summary = self.settings.run_dir(job.id) / "run.json"
        if not summary.is_file():
            raise PhituneError(f"the training run ended without writing {summary.name}")
        run = json.loads(summary.read_text())
        result = self.result_file(job)
        self.finish(
            job.id,
            Status.SUCCEEDED,
            message="The job has successfully completed",
            fine_tuned_model=name,
            trained_tokens=run.get("trained_tokens"),
            result_files=[result],
            estimated_finish=None,
        )
        return None

    def sync(self, job: Job, name: str, started: float) -> str | None:
        """Metrics -> events, checkpoints -> objects, heartbeat; returns a cancel / pause request."""
        run = self.settings.run_dir(job.id)
        records = read_metrics(run / "metrics.jsonl")
        with self.sessions() as db:
            current = store.job_by_id(db, job.id)
            assert current is not None  # job rows are never deleted
            total = current.total_steps
            # The database is the record of what was emitted (a failed commit emitted nothing). A
            # resumed run logs the steps after its checkpoint again: those are skipped.
            last = store.last_event_step(db, job.id)
            for r in records:
                if r["step"] <= last:
                    continue
                last = r["step"]
                data = _metric_data(r, total)
                add_event(
                    db,
                    job.id,
                    f"Step {r['step']}" + (f"/{total}" if total else "") + f": training loss={r['loss']:.4f}"
                    if "loss" in r
                    else f"Step {r['step']}: validation loss={r.get('eval_loss', float('nan')):.4f}",
                    type="metrics",
                    data=data,
                    step=r["step"],
                )
            rows = store.checkpoint_states(db, job.id)
            on_disk = {checkpoint_step(ck): ck for ck in list_checkpoints(run / "checkpoints")}
            gone = [step for step, deleted in rows.items() if not deleted and step not in on_disk]
            if gone:  # rotated out (--keep-checkpoints): no longer a model to call
                store.delete_checkpoints(db, job.id, gone)
            new = [(step, ck) for step, ck in on_disk.items() if step not in rows and (ck / "adapter").is_dir()]
            for step, ck in new:
                metrics = _metric_data(next((r for r in records if r["step"] == step), {"step": step}), total)
                db.add(
                    Checkpoint(
                        id=new_id("ftckpt"),
                        job_id=job.id,
                        step=step,
                        metrics=metrics,
                        model_name=f"{name}:ckpt-step-{step}",
                    )
                )
            values: dict = {"heartbeat": time.time()}
            if total is None and (run / "config.yaml").is_file():
                values["total_steps"] = total = _total_steps(run, records)
            finish = _estimated_finish(records, total, started)
            if finish is not None:
                values["estimated_finish"] = finish
            store.set_job(db, job.id, **values)
            db.commit()
        quota = self.settings.org_quota_bytes  # checked per new checkpoint, the disk walked after the commit
        if new and quota and not current.requested and usage(self.settings, self.sessions, job.org) > quota:
            return QUOTA
        return current.requested

    def result_file(self, job: Job) -> str:
        """step_metrics.csv as a file of purpose fine-tune-results."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"])
        for r in read_metrics(self.settings.run_dir(job.id) / "metrics.jsonl"):
            writer.writerow(
                [
                    r["step"],
                    r.get("loss", ""),
                    r.get("mean_token_accuracy", r.get("accuracy", "")),
                    r.get("eval_loss", ""),
                    r.get("eval_mean_token_accuracy", ""),
                ]
            )
        file_id = new_id("file")
        data = out.getvalue().encode()
        self.settings.file_path(file_id, "fine-tune-results").write_bytes(data)
        with self.sessions() as db:
            db.add(
                File(id=file_id, org=job.org, filename="step_metrics.csv", purpose="fine-tune-results", bytes=len(data))
            )
            db.commit()
        return file_id


def _estimated_finish(records: list[dict], total: int | None, started: float) -> int | None:
    """When the run ends at the step rate this subprocess has shown so far.

    Only steps logged after `started` count, timed from the first of them: a resumed run's earlier
    steps and the subprocess's start-up (imports, model loading; seconds, on a slow machine more than
    the steps) would otherwise make the first estimates of a long job far too late.
    """
    timed = [r for r in records if "loss" in r and r.get("time", 0) >= started]
    if not total or len(timed) < 2 or timed[-1]["step"] <= timed[0]["step"]:
        return None
    rate = (timed[-1]["time"] - timed[0]["time"]) / (timed[-1]["step"] - timed[0]["step"])
    return int(timed[-1]["time"] + rate * max(total - timed[-1]["step"], 0))


def _metric_data(r: dict, total: int | None) -> dict:
    """OpenAI's metric keys, plus DPO's rewards (train_reward_margin, valid_reward_accuracy, ...)."""
    rewards = {
        ("valid_" + k[5:] if k.startswith("eval_") else "train_" + k): v
        for k, v in r.items()
        if k.startswith(("reward_", "eval_reward_"))
    }
    return {
        "step": r["step"],
        "total_steps": total,
        "epoch": r.get("epoch"),
        "train_loss": r.get("loss"),
        "train_mean_token_accuracy": r.get("mean_token_accuracy", r.get("accuracy")),
        "valid_loss": r.get("eval_loss"),
        "valid_mean_token_accuracy": r.get("eval_mean_token_accuracy"),
        "full_valid_loss": r.get("eval_loss"),
        "full_valid_mean_token_accuracy": r.get("eval_mean_token_accuracy"),
        **rewards,
    }


def _total_steps(run: Path, records: list[dict]) -> int | None:
    """From the progress the run logged: steps per epoch x epochs (metrics' fractional epoch)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    if cfg["training"].get("max_steps"):
        return cfg["training"]["max_steps"]
    with_epoch = [r for r in records if r.get("epoch") and "loss" in r]
    if not with_epoch:
        return None
    r = with_epoch[-1]
    return round(r["step"] / r["epoch"] * (cfg["training"].get("epochs") or 1))


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM to the run's process group, SIGKILL after 10 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_error(log_file: Path) -> str:
    lines = (
        [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        if log_file.is_file()
        else []
    )
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["the training process exited without output"])[-1].replace("phitune: error: ", "")[:500]
