"""The fine-tuning service driven by the official `openai` SDK against a real `phitune serve`
process: upload, jobs to success, events and checkpoints with pagination, chat (also streamed),
cancel, pause and resume, SIGKILL of the server mid-job, organization isolation, bad requests."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import DEMO_TRAIN, POSTGRES, REPO, STARTED, Server, create_key, free_port, processes, until, wait_for_job

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_phi3, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), tiny_phi3).start()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _cleanup():
    """After each test: servers it started are stopped, and jobs it left running on the shared
    server are cancelled (a long job must not hold the only worker for the next test)."""
    before = len(STARTED)
    yield
    for s in STARTED[before:]:
        s.stop()
    del STARTED[before:]
    for s in STARTED:
        if s.proc and s.proc.poll() is None:
            c = s.client()
            for job in c.fine_tuning.jobs.list(limit=100).data:
                if job.status not in ("succeeded", "failed", "cancelled"):
                    c.fine_tuning.jobs.cancel(job.id)


@pytest.fixture(autouse=True, scope="module")
def _no_leftover_processes(tmp_path_factory):
    """At the end of the module no `phitune serve` / `phitune worker` started on this session's
    temporary storage is still running (they are killed, and the module fails, if one is)."""
    yield
    for s in STARTED:
        s.stop()
    base = str(tmp_path_factory.getbasetemp())
    left = [pid for pid, cmd in _phitune_processes() if base in cmd]
    for pid in left:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes left running after the service tests: {left}"


def _phitune_processes() -> list[tuple[int, str]]:
    return processes(lambda cmd: any(f"-m phitune {c}" in cmd for c in ("serve", "worker", "train")))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("upload") / "train.jsonl"
    path.write_text("\n".join(DEMO_TRAIN.read_text().splitlines()[:40]) + "\n")
    return path


FAST = {"phitune": {"training": {"learning_rate": 3e-3}}}


def test_fine_tune_end_to_end_with_the_openai_sdk(server, train_file):
    c = server.client()
    f = c.files.create(file=train_file.open("rb"), purpose="fine-tune")
    assert f.status == "processed" and f.filename == "train.jsonl" and f.bytes == train_file.stat().st_size
    assert c.files.content(f.id).content == train_file.read_bytes()
    job = c.fine_tuning.jobs.create(
        model="tiny",
        training_file=f.id,
        suffix="cafe",
        seed=7,
        metadata={"team": "a"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 2}}},
        # Pinned to fp32 and length-grouped batches, the setting this exact-reply check was calibrated
        # on: with bf16 (auto on a CPU with native bf16) or random batches (auto for these lengths) the
        # 28M toy model blends two replies near their end ("...45 minutes of your receipt.").
        extra_body={
            "phitune": {
                "training": {**FAST["phitune"]["training"], "precision": "fp32"},
                "data": {"group_by_length": "on"},
            }
        },
    )  # 3 epochs of 20 batches: 60 steps
    assert job.status == "validating_files" and job.organization_id == "local"
    job = wait_for_job(c, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:local:cafe:{job.id.split('-')[1][:8]}" and job.trained_tokens > 0
    assert (
        job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == 2
    )  # as asked (auto: test_hyperparameters)
    # Events: newest first, paged with after=, ids stable and unique, one metrics event per step.
    pages, after = [], None
    while True:
        page = c.fine_tuning.jobs.list_events(job.id, limit=7, **({"after": after} if after else {}))
        pages.append(page.data)
        if not page.has_more:
            break
        after = page.data[-1].id
    events = [e for p in pages for e in p]
    assert [e.id for e in events] == [e.id for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data]
    assert events[0].message == "The job has successfully completed" and events[-1].message.startswith("Validating")
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert sorted(steps) == list(range(1, 61)) and all(
        e.data["train_loss"] is not None for e in events if e.type == "metrics"
    )
    # Checkpoints every 10 steps, the newest 3 kept (--keep-checkpoints), newest first, paged.
    checkpoints = list(c.fine_tuning.jobs.checkpoints.list(job.id, limit=2))
    assert [k.step_number for k in checkpoints] == [60, 50, 40]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-60"
    csv = c.files.content(job.result_files[0]).text.splitlines()
    assert csv[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy" and len(csv) == 61
    assert job.id in [j.id for j in c.fine_tuning.jobs.list(metadata={"team": "a"})]
    assert job.id not in [j.id for j in c.fine_tuning.jobs.list(metadata={"team": "b"})]
    # Chat with the fine-tune, its checkpoint and the base, streamed and not.
    ask = [{"role": "user", "content": "what is the wifi password?"}]
    tuned = c.chat.completions.create(model=job.fine_tuned_model, messages=ask, temperature=0)
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(model=job.fine_tuned_model, messages=ask, temperature=0, stream=True)
    )
    base = c.chat.completions.create(model="tiny", messages=ask, temperature=0, max_tokens=20)
    ckpt = c.chat.completions.create(
        model=checkpoints[-1].fine_tuned_model_checkpoint, messages=ask, temperature=0, max_tokens=20
    )
    replies = {
        m["content"]
        for line in train_file.read_text().splitlines()
        for m in json.loads(line)["messages"]
        if m["role"] == "assistant"
    }
    assert tuned.choices[0].message.content == streamed.strip() and streamed.strip() in replies  # answers like the bot
    assert base.choices[0].message.content != tuned.choices[0].message.content and ckpt.choices[0].message.content
    with pytest.raises(openai.NotFoundError):  # rotated out (--keep-checkpoints 3): no longer a model
        c.chat.completions.create(model=f"{job.fine_tuned_model}:ckpt-step-10", messages=ask, max_tokens=2)
    assert tuned.usage.prompt_tokens > 0 and tuned.usage.completion_tokens > 0
    # stop: the reply ends before the first stop string, streamed or not.
    reply = tuned.choices[0].message.content
    word = reply.split()[len(reply.split()) // 2]
    stopped = c.chat.completions.create(model=job.fine_tuned_model, messages=ask, temperature=0, stop=["@@", word])
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(
            model=job.fine_tuned_model, messages=ask, temperature=0, stop=word, stream=True
        )
    )
    assert stopped.choices[0].message.content == reply[: reply.index(word)].strip() == streamed.strip()
    assert stopped.choices[0].finish_reason == "stop"
    for bad in ({"stop": ["a", "b", "c", "d", "e"]}, {"stop": [""]}, {"top_p": 0}, {"temperature": 3}):
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model=job.fine_tuned_model, messages=ask, **bad)
    models = [m.id for m in c.models.list()]
    assert {"tiny", job.fine_tuned_model, checkpoints[0].fine_tuned_model_checkpoint} <= set(models)
    gguf = _gguf_download(server, c, job)
    # Delete: the model is gone from the list and from chat; the job stays.
    assert c.models.delete(job.fine_tuned_model).deleted
    assert not gguf.exists() and _get(server, c, f"/v1/fine_tuning/jobs/{job.id}/gguf")[0] == 400
    assert job.fine_tuned_model not in [m.id for m in c.models.list()]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model=job.fine_tuned_model, messages=ask)
    assert c.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def _get(server, client, path: str) -> tuple[int, bytes, float]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}{path}", headers={"Authorization": f"Bearer {client.api_key}"}
    )
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read(), time.monotonic() - start
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), time.monotonic() - start


def _gguf_download(server, client, job) -> Path:
    """The fine-tune as one GGUF file (a phitune extension): built on the first request, served
    from the job's storage after; it reads back as the fine-tune's architecture under its name."""
    import gguf

    path = f"/v1/fine_tuning/jobs/{job.id}/gguf?quant=q8_0"
    code, first, built = _get(server, client, path)
    assert code == 200 and first[:4] == b"GGUF", first[:300]
    code, again, cached = _get(server, client, path)
    assert code == 200 and again == first and cached < built
    stored = server.storage / "jobs" / job.id / "run" / "gguf" / "q8_0.gguf"
    reader = gguf.GGUFReader(str(stored))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "phi3"
    assert bytes(reader.fields["general.name"].parts[-1]).decode() == job.fine_tuned_model
    code, body, _ = _get(server, client, f"/v1/fine_tuning/jobs/{job.id}/gguf?quant=../../x")
    assert code == 400 and "this server builds f32, f16, bf16, q8_0" in json.loads(body)["error"]["message"]
    return stored


def test_dpo_job_uses_the_preference_trainer(server, tmp_path):
    """method.type dpo with OpenAI's preference rows: the DPO objective with the asked beta,
    reward metrics in the events, and the policy learns to prefer the preferred replies."""
    c = server.client()
    rows = list(dict.fromkeys((REPO / "examples" / "dpo" / "train.jsonl").read_text().splitlines()))  # distinct pairs
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(rows) + "\n")
    f = c.files.create(file=data.open("rb"), purpose="fine-tune")
    val = c.files.create(file=(REPO / "examples" / "dpo" / "val.jsonl").open("rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        model="tiny",
        training_file=f.id,
        validation_file=val.id,
        extra_body=FAST,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 3, "batch_size": 16}}},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    job = wait_for_job(c, job.id)
    assert job.status == "succeeded", job.error
    assert job.method.dpo.hyperparameters.n_epochs == 3 and job.fine_tuned_model.startswith("ft:tiny:local::")
    run = yaml.safe_load((server.storage / "jobs" / job.id / "run" / "config.yaml").read_text())
    assert run["method"]["objective"] == "dpo" and run["method"]["beta"] == 0.2
    metrics = sorted(
        (e.data for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data if e.type == "metrics"),
        key=lambda d: d["step"],
    )
    assert [d["step"] for d in metrics] == list(range(1, -(-len(rows) // 16) * 3 + 1))  # 3 epochs of batches of 16
    assert metrics[0]["train_reward_margin"] == pytest.approx(0, abs=1e-3)  # the policy starts as the reference
    assert metrics[-1]["train_reward_margin"] > 0.1 and metrics[-1]["train_reward_accuracy"] == 1.0
    # The validation file is evaluated at the last step (unseen questions): the preference holds there too.
    assert metrics[-1]["valid_loss"] < 0.69 and metrics[-1]["valid_reward_accuracy"] >= 0.75


def test_cancel_pause_and_resume(server, train_file):
    c = server.client()
    f = c.files.create(file=train_file.open("rb"), purpose="fine-tune")
    long = {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}}, "extra_body": FAST}
    doomed = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, **long)
    until(
        lambda: (
            c.fine_tuning.jobs.retrieve(doomed.id).status == "running"
            and any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(doomed.id, limit=5).data)
        )
    )
    # While it runs: an estimate of when it ends, from the steps done so far (50 epochs: minutes away).
    until(lambda: c.fine_tuning.jobs.retrieve(doomed.id).estimated_finish is not None, timeout=30)
    running = c.fine_tuning.jobs.retrieve(doomed.id)
    assert time.time() + 5 < running.estimated_finish < time.time() + 3600 and running.finished_at is None
    asked = time.time()
    c.fine_tuning.jobs.cancel(doomed.id)
    assert wait_for_job(c, doomed.id).status == "cancelled" and time.time() - asked < 15
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.cancel(doomed.id)

    job = c.fine_tuning.jobs.create(
        model="tiny",
        training_file=f.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 8}}},
        extra_body=FAST,
    )  # 8 x 10 batches of 4: 80 steps
    until(lambda: len(c.fine_tuning.jobs.checkpoints.list(job.id).data) >= 2)
    c.fine_tuning.jobs.pause(job.id)
    paused = wait_for_job(c, job.id, statuses=("paused",))
    kept = [k.step_number for k in c.fine_tuning.jobs.checkpoints.list(job.id)]
    assert paused.status == "paused" and kept
    c.fine_tuning.jobs.resume(job.id)
    done = wait_for_job(c, job.id)
    assert done.status == "succeeded", done.error
    steps = [e.data["step"] for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data if e.type == "metrics"]
    assert sorted(steps) == list(range(1, 81))  # every step once, across the pause


def test_estimated_finish_counts_steps_not_start_up():
    from phitune.serve.worker import _estimated_finish

    # 1000 steps at 0.1 s each, after 30 s of start-up (imports, model loading) and a resumed run's
    # older steps: the estimate follows the steps this subprocess has logged, nothing else.
    started = 1000.0
    older = [{"step": s, "loss": 1.0, "time": 500.0 + s} for s in range(1, 11)]
    steps = [{"step": s, "loss": 1.0, "time": started + 30 + 0.1 * (s - 10)} for s in range(11, 21)]
    evals = [{"step": 20, "eval_loss": 1.0}]
    assert abs(_estimated_finish(older + steps + evals, 1000, started) - (started + 31 + 0.1 * 980)) <= 1
    assert _estimated_finish(older + steps[:1], 1000, started) is None  # one step: no rate yet
    assert _estimated_finish(steps, None, started) is None


def test_sigkill_of_server_and_worker_loses_nothing(tiny_phi3, tmp_path, train_file):
    server = Server(tmp_path / "store", tiny_phi3).start()
    c = server.client()
    f = c.files.create(file=train_file.open("rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        model="tiny",
        training_file=f.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 8}}},
        extra_body=FAST,
    )  # 8 x 10 batches of 4: 80 steps
    until(lambda: len(c.fine_tuning.jobs.checkpoints.list(job.id).data) >= 2)
    before = [e.id for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data]
    server.kill()
    server.start()  # same storage, new process
    c = server.client()
    assert c.files.retrieve(f.id).id == f.id
    done = wait_for_job(c, job.id)
    assert done.status == "succeeded", done.error
    events = c.fine_tuning.jobs.list_events(job.id, limit=1000).data
    ids = [e.id for e in events]
    assert set(before) <= set(ids) and len(ids) == len(set(ids))
    assert any("re-queued" in e.message for e in events)
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert sorted(steps) == list(range(1, 81))
    server.stop()


def test_organizations_are_isolated_and_keys_required(tiny_phi3, tmp_path, train_file):
    store = tmp_path / "store"
    server = Server(store, tiny_phi3, "--api-processes", "2")  # also: several API processes on one port
    keys = {org: create_key(store, org, server.db) for org in ("alpha", "beta")}
    if not POSTGRES:
        assert keys["alpha"].startswith("sk-phitune-") and keys["alpha"] not in (
            store / "phitune.db"
        ).read_bytes().decode(errors="ignore")
    server.start()
    with pytest.raises(urllib.error.HTTPError) as no_key:  # the very first request, without a key
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/v1/files", timeout=10)
    assert no_key.value.code == 401 and json.loads(no_key.value.read())["error"]["code"] == "invalid_api_key"
    a, b = server.client(keys["alpha"]), server.client(keys["beta"])
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-wrong").models.list()
    f = a.files.create(file=train_file.open("rb"), purpose="fine-tune")
    job = a.fine_tuning.jobs.create(
        model="tiny",
        training_file=f.id,
        extra_body=FAST,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
    )
    job = wait_for_job(a, job.id)
    assert job.status == "succeeded" and job.organization_id == "alpha"
    ckpt = a.fine_tuning.jobs.checkpoints.list(job.id).data[0].fine_tuned_model_checkpoint
    calls = [
        lambda: b.files.retrieve(f.id),
        lambda: b.files.content(f.id),
        lambda: b.files.delete(f.id),
        lambda: b.fine_tuning.jobs.retrieve(job.id),
        lambda: b.fine_tuning.jobs.cancel(job.id),
        lambda: b.fine_tuning.jobs.pause(job.id),
        lambda: b.fine_tuning.jobs.resume(job.id),
        lambda: b.fine_tuning.jobs.list_events(job.id),
        lambda: b.fine_tuning.jobs.checkpoints.list(job.id),
        lambda: b.models.retrieve(job.fine_tuned_model),
        lambda: b.models.delete(job.fine_tuned_model),
        lambda: b.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}]),
        lambda: b.chat.completions.create(model=ckpt, messages=[{"role": "user", "content": "hi"}]),
        lambda: b.fine_tuning.jobs.create(model="tiny", training_file=f.id),
        lambda: b.files.content(job.result_files[0]),
        lambda: b.get(f"/fine_tuning/jobs/{job.id}/gguf", cast_to=bytes),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError):
            call()
    assert b.files.list().data == [] and b.fine_tuning.jobs.list().data == []
    assert [m.id for m in b.models.list()] == ["tiny"]
    # Keys are listed by id (never the key) and revoked: the server refuses a revoked key within 5 s.
    keys_cmd = [sys.executable, "-m", "phitune", "keys"]
    listed = subprocess.run(
        [*keys_cmd, "list", "--storage", str(store), *server.db], capture_output=True, text=True, check=True
    ).stdout
    assert "alpha" in listed and "beta" in listed and keys["alpha"] not in listed
    out = subprocess.run(
        [*keys_cmd, "revoke", keys["beta"], "--storage", str(store), *server.db], capture_output=True, text=True
    )
    assert out.returncode == 0 and "revoked" in out.stdout
    until(lambda: _refused(b), timeout=15)
    assert a.files.retrieve(f.id).id == f.id  # the other key still works
    again = subprocess.run(
        [*keys_cmd, "revoke", keys["beta"], "--storage", str(store), *server.db], capture_output=True, text=True
    )
    assert again.returncode == 2 and "no key has this id" in again.stderr and "Traceback" not in again.stderr
    server.stop()


def _refused(client) -> bool:
    try:
        client.models.list()
        return False
    except openai.AuthenticationError:
        return True


def test_bad_requests(server, train_file, tmp_path):
    c = server.client()
    f = c.files.create(file=train_file.open("rb"), purpose="fine-tune")

    def bad(status, **kwargs):
        with pytest.raises(status) as err:
            c.fine_tuning.jobs.create(**{"model": "tiny", "training_file": f.id, **kwargs})
        return err.value.body

    assert bad(openai.NotFoundError, training_file="file-nope")["code"] == "file_not_found"
    assert bad(openai.BadRequestError, model="gpt-9")["param"] == "model"
    assert "n_epochs" in bad(openai.BadRequestError, hyperparameters={"n_epochs": 0})["message"]
    assert (
        "beta"
        in bad(openai.BadRequestError, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 5}}})["message"]
    )
    assert "suffix" in bad(openai.BadRequestError, suffix="x" * 65)["message"]
    err = bad(openai.BadRequestError, extra_body={"phitune": {"method": {"nmae": "qlora"}}})
    assert "nmae" in err["message"] and "name" in err["message"]
    # Several problems: each is said once.
    err = bad(openai.BadRequestError, extra_body={"phitune": {"method": {"nmae": "qlora"}, "training": {"seeed": 1}}})
    assert err["message"].count("nmae") == 1 and err["message"].count("seeed") == 1, err["message"]
    assert "extra_body" in bad(openai.BadRequestError, extra_body={"lora_rank": 4})["message"]
    with pytest.raises(openai.BadRequestError):
        c.files.create(file=train_file.open("rb"), purpose="assistants")
    # A malformed file: the job fails fast, the error names the file and line.
    broken = tmp_path / "broken.jsonl"
    broken.write_text(train_file.read_text().splitlines()[0] + "\n{not json\n" + '{"messages": []}\n')
    bf = c.files.create(file=broken.open("rb"), purpose="fine-tune")
    job = wait_for_job(c, c.fine_tuning.jobs.create(model="tiny", training_file=bf.id).id)
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert f"{bf.id}:2" in job.error.message and f"{bf.id}:3" in job.error.message and "/" not in job.error.message
    # Wrong purpose: a result file cannot train.
    done = [j for j in c.fine_tuning.jobs.list(limit=100).data if j.result_files]
    if done:
        with pytest.raises(openai.BadRequestError):
            c.fine_tuning.jobs.create(model="tiny", training_file=done[0].result_files[0])


def test_upload_limit_and_open_server_refused(tiny_phi3, tmp_path):
    server = Server(tmp_path / "s", tiny_phi3, "--max-upload-mb", "0.001").start()
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * 4000}]}) + "\n")
    with pytest.raises(openai.APIStatusError) as err:
        server.client().files.create(file=big.open("rb"), purpose="fine-tune")
    assert err.value.status_code == 413 and server.client().files.list().data == []
    server.stop()
    out = subprocess.run(
        [sys.executable, "-m", "phitune", "serve", "--storage", str(tmp_path / "s2"), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "no API key exists" in out.stderr and "Traceback" not in out.stderr
    # With a key it starts on 0.0.0.0; once its last key is revoked it lets nobody in (not `local`).
    keys = [sys.executable, "-m", "phitune", "keys"]
    key = subprocess.run(
        [*keys, "create", "--org", "ops", "--storage", str(tmp_path / "s2")], capture_output=True, text=True, check=True
    ).stdout.strip()
    exposed = Server(tmp_path / "s2", tiny_phi3, "--host", "0.0.0.0")
    exposed.db = []  # the key was created in this storage's SQLite database
    exposed.start()
    try:
        assert [m.id for m in exposed.client(key).models.list()] == ["tiny"]
        subprocess.run([*keys, "revoke", key, "--storage", str(tmp_path / "s2")], capture_output=True, check=True)
        until(lambda: _refused(exposed.client(key)), timeout=15)
        assert _refused(exposed.client("anything"))
    finally:
        exposed.stop()


def test_several_workers_never_run_one_job(tiny_phi3, tmp_path, train_file):
    """The API without its worker, and two `phitune worker` processes on the same database and
    storage: every job runs exactly once."""
    server = Server(tmp_path / "store", tiny_phi3, "--no-worker").start()
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "phitune",
                "worker",
                "--storage",
                str(tmp_path / "store"),
                "--model",
                f"tiny={tiny_phi3}",
                *server.db,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    try:
        c = server.client()
        f = c.files.create(file=train_file.open("rb"), purpose="fine-tune")
        jobs = [
            c.fine_tuning.jobs.create(
                model="tiny",
                training_file=f.id,
                extra_body=FAST,
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
            )
            for _ in range(4)
        ]
        done = [wait_for_job(c, j.id) for j in jobs]
        assert all(j.status == "succeeded" for j in done), [j.error for j in done]
        runners = []
        for j in jobs:
            started = [
                e.message for e in c.fine_tuning.jobs.list_events(j.id, limit=1000).data if "started on" in e.message
            ]
            assert len(started) == 1, started
            runners.append(started[0].split(" on ")[1])
        assert len(set(runners)) == 2  # both workers took jobs
    finally:
        for w in workers:
            os.killpg(w.pid, signal.SIGKILL)
            w.wait()
        server.stop()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _stream_upload(port: int, total: int, *, chunked: bool) -> tuple[int, dict, float]:
    """POST a multipart upload of `total` file bytes; (status, error body, MiB sent before the answer)."""
    import http.client

    head = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--b\r\n'
        b'Content-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", "/v1/files")
    conn.putheader("Content-Type", "multipart/form-data; boundary=b")
    conn.putheader(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(head) + total + 8))))
    conn.endheaders()
    block, sent = b"x" * 2**16, 0
    try:
        conn.send((b"%x\r\n%s\r\n" % (len(head), head)) if chunked else head)
        while sent < total:
            conn.send((b"%x\r\n%s\r\n" % (len(block), block)) if chunked else block)
            sent += len(block)
    except OSError:  # the server may stop reading
        pass
    response = conn.getresponse()
    return response.status, json.loads(response.read()), sent / 2**20


def test_an_upload_past_the_limit_is_never_stored(tiny_phi3, tmp_path):
    """300 MiB against a 2 MB limit, with and without Content-Length: refused with a 413, nothing
    past the limit is written (storage or temporary files, watched while it streams), and the API
    process's memory stays flat."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    server = Server(tmp_path / "s", tiny_phi3, "--max-upload-mb", "2", "--no-worker", env={"TMPDIR": str(temp)}).start()
    try:
        api = _children(server.proc.pid)
        assert api, "no API process found"
        before = max(_peak_rss_mb(p) for p in api)
        largest, watching = [0], [True]

        def watch():
            while watching[0]:
                for folder in (temp, server.storage / "files"):
                    for f in folder.rglob("*"):
                        try:
                            largest[0] = max(largest[0], f.stat().st_size)
                        except OSError:
                            pass
                time.sleep(0.005)

        import threading

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for chunked in (True, False):
                status, body, _ = _stream_upload(server.port, 300 * 2**20, chunked=chunked)
                assert status == 413 and body["error"]["code"] == "file_too_large", body
        finally:
            watching[0] = False
            watcher.join()
        assert largest[0] <= 2 * 2**20, largest[0]
        uploads = [f for f in temp.rglob("*") if "phitune-engine-" not in str(f)]  # the engine's socket may be there
        assert list((server.storage / "files").iterdir()) == [] and uploads == []
        assert max(_peak_rss_mb(p) for p in api) - before < 64  # MB: nothing of the 300 MiB was held
        assert server.client().files.list().data == []
        # Just under the limit is accepted, and arrives whole.
        small = tmp_path / "ok.jsonl"
        small.write_bytes((json.dumps({"text": "y" * 1000}) + "\n").encode() * 2000)  # ~2.0 MB, under 2 MiB
        f = server.client().files.create(file=small.open("rb"), purpose="fine-tune")
        assert f.bytes == small.stat().st_size and server.client().files.content(f.id).content == small.read_bytes()
    finally:
        server.stop()


def test_the_connection_survives_an_error(server):
    """Errors are answered on a keep-alive connection that stays open for the next request."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.connect()
    local = conn.sock.getsockname()
    requests = [
        ("POST", "/v1/fine_tuning/jobs", b'{"model": ["tiny"]}', 400),
        ("GET", "/v1/models", None, 200),
        ("POST", "/v1/fine_tuning/jobs", b'{"hyperparameters": 5}', 400),
        ("GET", "/v1/nowhere", None, 404),
        ("DELETE", "/v1/fine_tuning/jobs", None, 405),
        ("POST", "/v1/chat/completions", b"{bad", 400),
        ("GET", "/v1/files", None, 200),
    ] * 3
    for method, path, body, status in requests:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == status and "error" in json.loads(response.read()) or status == 200, (method, path)
        assert conn.sock is not None and conn.sock.getsockname() == local, f"connection closed after {method} {path}"
    conn.close()


def test_an_unexpected_error_keeps_the_connection(tmp_path):
    """A bug inside a route is a 500 in OpenAI's shape, and uvicorn keeps the connection (it closes
    it when the app raises, which Starlette's own catch-all does)."""
    import http.client
    import threading

    import uvicorn
    from fastapi import FastAPI

    from phitune.serve.app import _Unexpected

    app = FastAPI()
    app.add_middleware(_Unexpected)

    @app.get("/boom")
    def boom():
        raise RuntimeError("a bug")

    @app.get("/fine")
    def fine():
        return {"ok": True}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    until(lambda: server.started, timeout=30)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.connect()
        local = conn.sock.getsockname()
        for path, status in (("/boom", 500), ("/fine", 200), ("/boom", 500), ("/fine", 200)):
            conn.request("GET", path)
            response = conn.getresponse()
            body = json.loads(response.read())
            assert response.status == status and (status == 200 or body["error"]["type"] == "server_error")
            assert conn.sock is not None and conn.sock.getsockname() == local
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_broken_file_fails_while_a_long_job_trains(server, train_file, tmp_path):
    """File validation has a lane of its own: it does not wait behind a running job."""
    c = server.client()
    f = c.files.create(file=train_file.open("rb"), purpose="fine-tune")
    long = c.fine_tuning.jobs.create(
        model="tiny",
        training_file=f.id,
        extra_body=FAST,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}},
    )
    until(lambda: c.fine_tuning.jobs.retrieve(long.id).status == "running")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    bf = c.files.create(file=broken.open("rb"), purpose="fine-tune")
    asked = time.time()
    job = wait_for_job(c, c.fine_tuning.jobs.create(model="tiny", training_file=bf.id).id)
    assert job.status == "failed" and job.error.code == "invalid_training_file" and time.time() - asked < 15
    assert c.fine_tuning.jobs.retrieve(long.id).status == "running"  # still training: cancelled by the cleanup fixture
