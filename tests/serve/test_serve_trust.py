"""What a tenant can and cannot make the service do, in process (the app on a TestClient, the
worker called directly): every config key is either a job option or the server's, every server key
is refused by name, wrong types are 400s in OpenAI's shape, numbers are finite and in range, the
stored job is checked again before it runs, and a failed or cancelled job always ends."""

import json
import re
import time
import typing
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from phitune.config import _SECTIONS, Config  # noqa: E402
from phitune.errors import PhituneError  # noqa: E402
from phitune.serve.app import create_app  # noqa: E402
from phitune.serve.db import ApiKey, Job  # noqa: E402
from phitune.serve.deps import hash_key  # noqa: E402
from phitune.serve.options import SERVER_OWNED, TENANT, allowed_keys, classify  # noqa: E402
from phitune.serve.settings import Settings  # noqa: E402
from phitune.serve.worker import Worker  # noqa: E402

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def service(tiny_phi3, tmp_path_factory):
    settings = Settings(
        storage=tmp_path_factory.mktemp("trust"), models={"tiny": str(tiny_phi3)}, max_upload_bytes=4096
    )
    app = create_app(settings)
    with app.state.sessions() as db:
        db.add_all([ApiKey(org="alpha", key_hash=hash_key("key-a")), ApiKey(org="beta", key_hash=hash_key("key-b"))])
        db.commit()
    clients = {org: TestClient(app, headers={"Authorization": f"Bearer key-{org[0]}"}) for org in ("alpha", "beta")}
    data = tmp_path_factory.mktemp("rows") / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
            + "\n"
            for i in range(8)
        )
    )
    up = clients["alpha"].post(
        "/v1/files", files={"file": ("train.jsonl", data.read_bytes())}, data={"purpose": "fine-tune"}
    )
    assert up.status_code == 200, up.text
    return {"app": app, "settings": settings, "file": up.json()["id"], **clients}


def _create(client, file_id, **body):
    return client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id, **body})


def _leaves(model: type[BaseModel], prefix: str = ""):
    """Every config key path; a section's keys from its model in _SECTIONS (the method section's
    are every method's keys)."""
    for name, info in model.model_fields.items():
        if prefix == "" and name in _SECTIONS:
            yield from _leaves(_SECTIONS[name], f"{name}.")
        else:
            yield f"{prefix}{name}", info


# --- the allow-list covers the whole config ------------------------------------------------------


def test_every_config_key_is_a_job_option_or_the_servers():
    leaves = dict(_leaves(Config))
    unclassified = [path for path in leaves if classify(path) == "unclassified"]
    assert not unclassified, f"classify these in serve/options.py (TENANT or SERVER_OWNED): {unclassified}"
    assert set(allowed_keys()) <= set(leaves)  # no stale allow-list entry
    # A job option that takes free text could carry a path: each one was reviewed (it is a pattern,
    # a name or a message, never opened); a new one fails here until it is reviewed too.
    for path in allowed_keys():
        if _takes_text(leaves[path].annotation):
            assert path in REVIEWED_TEXT, f"{path}: a job option taking free text; make sure it is never a path"
    for path in (
        "model.name_or_path",
        "model.tokenizer",
        "model.trust_remote_code",
        "data.train",
        "data.validation",
        "distributed.deepspeed_config",
        "output_dir",
    ):
        assert classify(path) == "server", path
    assert set(TENANT) <= set(_SECTIONS)


REVIEWED_TEXT = {
    "data.template",
    "data.completion_field",
    "data.system",
    "method.target_modules",
    "method.modules_to_save",
    "method.prompt_init_text",
    "task.labels",
    "task.instruction",
    "task.source_language",
    "task.target_language",
    "task.fields",
    "training.best_metric",
}


def _takes_text(annotation) -> bool:
    if annotation is str:
        return True
    if typing.get_origin(annotation) is typing.Literal:
        return False
    return any(_takes_text(a) for a in typing.get_args(annotation))


SERVER_KEYS = [path for path, _ in _leaves(Config) if classify(path) == "server"]


@pytest.mark.parametrize("path", SERVER_KEYS)
def test_every_server_key_is_refused_by_name(service, path):
    section, _, key = path.partition(".")
    options = {section: {key: "x"}} if key else {section: "x"}
    r = _create(service["alpha"], service["file"], phitune=options)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == f"phitune.{path}", err
    assert "set by the server" in err["message"] and (SERVER_OWNED.get(path) or SERVER_OWNED[section]) in err["message"]


def test_a_tenant_key_is_accepted_and_reaches_the_config(service, tmp_path):
    from phitune.serve.jobconfig import build_config

    r = _create(
        service["alpha"],
        service["file"],
        phitune={"method": {"name": "dora", "r": 4}, "data": {"max_length": 128}, "training": {"warmup_steps": 2}},
    )
    assert r.status_code == 200, r.text
    with service["app"].state.sessions() as db:
        job = db.query(Job).filter(Job.id == r.json()["id"]).one()
        cfg = build_config(service["settings"], job, {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.0})
    s = service["settings"]
    assert (cfg.method.name, cfg.method.r, cfg.data.max_length, cfg.training.warmup_steps) == ("dora", 4, 128, 2)
    assert cfg.output_dir == str(s.run_dir(job.id)) and cfg.data.train == str(s.file_path(service["file"]))
    assert cfg.model.name_or_path == s.models["tiny"] and cfg.model.trust_remote_code is False


# --- organizations and paths ---------------------------------------------------------------------


def test_another_organization_cannot_reach_a_file_by_id_or_by_path(service):
    a_path = str(service["settings"].file_path(service["file"]))
    b = service["beta"]
    own = b.post(
        "/v1/files", files={"file": ("x.jsonl", b'{"text": "hello"}\n')}, data={"purpose": "fine-tune"}
    ).json()["id"]
    assert _create(b, service["file"]).status_code == 404
    for options in (
        {"data": {"train": a_path}},
        {"data": {"validation": a_path}},
        {"model": {"name_or_path": a_path}},
        {"data": {"format": "auto", "train": a_path}},
        {"output_dir": "/tmp"},
        {"distributed": {"deepspeed_config": a_path}},
        {"model": {"tokenizer": "/etc"}},
    ):
        r = _create(b, own, phitune=options)
        assert r.status_code == 400 and "set by the server" in r.json()["error"]["message"], (options, r.text)
    assert _create(b, own, model="/" + service["settings"].models["tiny"]).status_code == 400  # served names only


# --- types and numbers ---------------------------------------------------------------------------


TYPED = [
    {"model": ["tiny"]},
    {"model": {"a": 1}},
    {"hyperparameters": "x"},
    {"hyperparameters": 5},
    {"method": {"type": "supervised", "supervised": "x"}},
    {"method": {"type": "supervised", "supervised": {"hyperparameters": [1]}}},
    {"phitune": {"training": "x"}},
    {"phitune": "x"},
    {"seed": "7"},
    {"seed": True},
    {"suffix": 5},
    {"metadata": {"a": 1}},
    {"metadata": []},
    {"method": {"type": "reinforcement"}},
    {"method": "supervised"},
    {"training_file": None},
    {"integrations": [{}]},
    {"hyperparameters": {"n_epochs": "3"}},
    {"hyperparameters": {"lr": 1}},
    {"phitune": {"method": {"r": "8"}}},
    {"phitune": {"data": {"max_length": 10**9}}},
    {"phitune": {"method": {"r": 10**7}}},
]


@pytest.mark.parametrize("body", TYPED, ids=[json.dumps(b)[:40] for b in TYPED])
def test_wrong_types_are_400_in_openai_shape(service, body):
    r = _create(service["alpha"], service["file"], **body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["message"], r.text
    assert err["param"] and err["param"].split(".")[0] in body or err["param"].startswith("phitune"), err


@pytest.mark.parametrize(
    "raw,param",
    [
        ('"hyperparameters": {"learning_rate_multiplier": 1e300}', "hyperparameters.learning_rate_multiplier"),
        ('"hyperparameters": {"learning_rate_multiplier": Infinity}', "hyperparameters.learning_rate_multiplier"),
        ('"hyperparameters": {"learning_rate_multiplier": NaN}', "hyperparameters.learning_rate_multiplier"),
        (
            '"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -Infinity}}}',
            "method.dpo.hyperparameters.beta",
        ),
        ('"phitune": {"training": {"learning_rate": 1e300}}', "phitune.training.learning_rate"),
        ('"phitune": {"training": {"weight_decay": Infinity}}', "phitune.training.weight_decay"),
        ('"phitune": {"method": {"dropout": NaN}}', "phitune.method.dropout"),
    ],
)
def test_numbers_are_finite_and_in_range(service, raw, param):
    body = '{"model": "tiny", "training_file": "%s", %s}' % (service["file"], raw)
    r = service["alpha"].post("/v1/fine_tuning/jobs", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_chat_options_are_checked(service):
    c = service["alpha"]
    for bad, param in (
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": [""]}, "stop"),
        ({"n": 2}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"model": 1}, "model"),
    ):
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
    assert c.post("/v1/chat/completions", json={"model": "/etc", "messages": CHAT}).status_code == 404


def test_a_prompt_longer_than_the_model_is_refused(service):
    config = Path(service["settings"].models["tiny"]) / "config.json"
    positions = json.loads(config.read_text())["max_position_embeddings"]
    long = [{"role": "user", "content": "hello " * (positions + 10)}]
    r = service["alpha"].post("/v1/chat/completions", json={"model": "tiny", "messages": long, "max_tokens": 2})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and str(positions) in err["message"], (
        r.text
    )
    ok = service["alpha"].post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_metrics_are_prometheus_text_behind_a_key(service):
    ok = service["alpha"].post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 3})
    assert ok.status_code == 200, ok.text
    r = service["beta"].get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4"), r.text
    assert "# TYPE phitune_time_to_first_token_seconds histogram" in r.text
    assert re.search(r'phitune_requests_total\{finish="(stop|length)",model="tiny"\} [1-9]', r.text), r.text
    assert TestClient(service["app"]).get("/metrics").status_code == 401


def test_an_adapter_of_another_base_fails_its_request_alone_without_naming_server_paths(service, model_cache):
    """A fine-tune whose adapter was trained on another base (here: a Llama's, on a Phi-3 server):
    that chat is a 400 naming the model id, never the server's storage path; others go on."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    settings = service["settings"]
    other = get_peft_model(AutoModelForCausalLM.from_pretrained(model_cache("llama")), LoraConfig(r=2))
    other.save_pretrained(settings.run_dir("ftjob-otherbase") / "adapter")
    name = "ft:tiny:alpha:other:ftjob-otherbase"
    with service["app"].state.sessions() as db:
        db.add(Job(id="ftjob-otherbase", org="alpha", model="tiny", training_file=service["file"], status="succeeded",
                   method={"type": "supervised"}, hyperparameters={}, phitune={}, fine_tuned_model=name))  # fmt: skip
        db.commit()
    r = service["alpha"].post("/v1/chat/completions", json={"model": name, "messages": CHAT, "max_tokens": 3})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "trained on another base model" in message and name in message, r.text
    assert str(settings.storage) not in message
    ok = service["beta"].post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 3})
    assert ok.status_code == 200, ok.text


# --- errors of the HTTP layer itself -------------------------------------------------------------


def test_every_error_is_openai_shaped(service):
    c = service["alpha"]
    fid = service["file"]
    r = c.options(f"/v1/files/{fid}")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "DELETE"} and "error" in r.json()
    r = c.put("/v1/fine_tuning/jobs")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "POST"} and "error" in r.json()
    r = c.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    for body, ctype in (
        (b"garbage", "multipart/form-data; boundary=zz"),
        (b"x", "text/plain"),
        (b"", "multipart/form-data"),
    ):
        r = c.post("/v1/files", content=body, headers={"content-type": ctype})
        assert r.status_code == 400 and "error" in r.json(), r.text
    r = c.post("/v1/fine_tuning/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert c.get("/v1/files?limit=0").status_code == 400 and c.get("/v1/files?order=up").status_code == 400
    schema = c.get("/openapi.json").json()
    job = schema["paths"]["/v1/fine_tuning/jobs"]["post"]
    assert "requestBody" in job and {"200", "400", "401", "404"} <= set(job["responses"])
    assert "multipart/form-data" in schema["paths"]["/v1/files"]["post"]["requestBody"]["content"]
    assert "requestBody" in schema["paths"]["/v1/chat/completions"]["post"]
    assert not [p for p in schema["paths"].values() for o in p.values() if "422" in o["responses"]]


def test_uploads_keep_names_harmless(service):
    body = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="../a\x00b\x1b.jsonl"\r\n\r\n'
        b'\xef\xbb\xbf{"text": "with a byte-order mark"}\r\n--b--\r\n'
    )
    r = service["alpha"].post("/v1/files", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 200 and r.json()["filename"] == "a_b_.jsonl", r.text
    stored = service["settings"].file_path(r.json()["id"])
    assert stored.read_bytes().startswith(b"\xef\xbb\xbf")
    from phitune.data.readers import read_rows

    rows, problems = read_rows(stored)
    assert not problems and rows[0].value == {"text": "with a byte-order mark"}
    other = service["alpha"].post("/v1/files", files={"upload": ("x.jsonl", b"{}")}, data={"purpose": "fine-tune"})
    assert other.status_code == 400 and other.json()["error"]["param"] == "file"
    twice = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{}\r\n' * 2
        + b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--b--\r\n'
    )
    r = service["alpha"].post("/v1/files", content=twice, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and "one file" in r.json()["error"]["message"]
    big = service["alpha"].post("/v1/files", files={"file": ("big.jsonl", b"x" * 5000)}, data={"purpose": "fine-tune"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "file_too_large"
    assert sorted(p.name for p in service["settings"].files_dir.iterdir()) == sorted(
        f["id"] + ".jsonl"
        for f in service["alpha"].get("/v1/files").json()["data"] + service["beta"].get("/v1/files").json()["data"]
    )


# --- the worker: checked again, always ends -------------------------------------------------------


def _queued_job(service, **values) -> str:
    from phitune.serve.db import new_id

    job_id = new_id("ftjob")
    with service["app"].state.sessions() as db:
        db.add(
            Job(
                **{
                    "id": job_id,
                    "org": "alpha",
                    "model": "tiny",
                    "training_file": service["file"],
                    "seed": 1,
                    "method": {"type": "supervised"},
                    "status": "queued",
                    "hyperparameters": {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.0},
                    **values,
                }
            )
        )
        db.commit()
    return job_id


def _only(service, job_id) -> Worker:
    """A worker, with every other job of this module's database out of its way."""
    with service["app"].state.sessions() as db:
        for job in db.query(Job).filter(Job.id != job_id, Job.status.in_(("validating_files", "queued"))):
            job.status = "cancelled"
        db.commit()
    return Worker(service["settings"], service["app"].state.sessions)


def _job(service, job_id) -> Job:
    with service["app"].state.sessions() as db:
        return db.query(Job).filter(Job.id == job_id).one()


def test_a_stored_job_with_server_options_is_refused_before_it_runs(service, tmp_path):
    """Defence in depth: a row that holds what the API would refuse (written before the allow-list,
    or by hand) fails with the reason and touches nothing."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    job_id = _queued_job(service, phitune={"output_dir": str(victim)})
    assert _only(service, job_id).step()
    job = _job(service, job_id)
    assert (
        job.status == "failed" and "output_dir" in job.error["message"] and "set by the server" in job.error["message"]
    )
    assert (victim / "precious.txt").read_text() == "keep me"


def test_the_built_config_is_compared_with_what_the_server_sets(service, monkeypatch):
    """The last check before a job runs: whatever produced the raw config (a bug in the merge, a
    new option), a path or trust setting that is not the server's own refuses the job."""
    from phitune.serve import jobconfig

    job = Job(
        id="ftjob-y",
        org="alpha",
        model="tiny",
        training_file=service["file"],
        seed=1,
        method={"type": "supervised"},
        hyperparameters={},
        phitune={},
    )
    hyper = {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.0}
    assert jobconfig.build_config(service["settings"], job, hyper).output_dir.endswith("ftjob-y/run")
    honest = jobconfig.raw_config
    for key, value in (
        ("output_dir", "/tmp/elsewhere"),
        ("model", {"name_or_path": service["settings"].models["tiny"], "trust_remote_code": True}),
        ("distributed", {"strategy": "ddp"}),
    ):
        monkeypatch.setattr(jobconfig, "raw_config", lambda *a, key=key, value=value: {**honest(*a), key: value})
        with pytest.raises(PhituneError, match="differ from what the server sets"):
            jobconfig.build_config(service["settings"], job, hyper)


def test_a_job_that_breaks_in_the_worker_ends_failed(service):
    job_id = _queued_job(service, model="gone")  # no longer served: building its config raises
    assert _only(service, job_id).step()
    job = _job(service, job_id)
    assert job.status == "failed" and job.error["code"] == "training_failed" and job.worker is None


def test_a_cancel_wins_over_a_requeue(service):
    cancelled = _queued_job(service, phitune={})
    paused = _queued_job(service, phitune={})
    with service["app"].state.sessions() as db:
        for job_id, asked in ((cancelled, "cancel"), (paused, "pause")):
            job = db.query(Job).filter(Job.id == job_id).one()
            job.status, job.worker, job.heartbeat, job.requested = "running", "lost@host", time.time() - 3600, asked
        db.commit()
    Worker(service["settings"], service["app"].state.sessions).requeue_stale()
    assert _job(service, cancelled).status == "cancelled" and _job(service, cancelled).finished_at
    assert _job(service, paused).status == "paused"


def test_a_final_status_is_never_overwritten(service):
    # Cancel, then pause, on a running job: the accepted cancel stands, the pause is refused.
    running = _queued_job(service, phitune={})
    with service["app"].state.sessions() as db:
        db.query(Job).filter(Job.id == running).update({"status": "running", "worker": "w", "heartbeat": time.time()})
        db.commit()
    assert service["alpha"].post(f"/v1/fine_tuning/jobs/{running}/cancel").status_code == 200
    pause = service["alpha"].post(f"/v1/fine_tuning/jobs/{running}/pause")
    assert pause.status_code == 400 and "cancel is already requested" in pause.json()["error"]["message"]
    assert _job(service, running).requested == "cancel"
    Worker(service["settings"], service["app"].state.sessions).conclude(
        _job(service, running), "n", -15, "cancel", stopping=False
    )
    assert _job(service, running).status == "cancelled"
    # Cancelled while its files are validated: the validation's own end (failed) does not land.
    validating = _queued_job(service, phitune={}, status="validating_files", hyperparameters={"n_epochs": "many"})
    assert service["alpha"].post(f"/v1/fine_tuning/jobs/{validating}/cancel").status_code == 200
    worker = Worker(service["settings"], service["app"].state.sessions)
    worker.validate(_job(service, validating))
    assert _job(service, validating).status == "cancelled"
    # No final status moves anywhere.
    for action in ("cancel", "pause", "resume"):
        r = service["alpha"].post(f"/v1/fine_tuning/jobs/{running}/{action}")
        assert r.status_code == 400 and _job(service, running).status == "cancelled", action


def test_any_error_while_validating_fails_the_job(service):
    """A stored job whose validation raises something other than phitune's own error (a bad stored
    value; once, a template's format spec) ends failed with the reason, never re-queued."""
    job_id = _queued_job(service, phitune={}, status="validating_files", hyperparameters={"n_epochs": "many"})
    assert _only(service, job_id).validate_next()
    job = _job(service, job_id)
    assert job.status == "failed" and job.worker is None and "ValueError" in job.error["message"], job.error


@pytest.mark.parametrize(
    "template", ["Q: {a:>25000000} A: {out}", "{a.b} {out}", "{0} {out}", "{out!r}", "{a[0]} {out}"]
)
def test_a_template_is_plain_substitutions_only(service, template):
    data = {"format": "template", "template": template, "completion_field": "out"}
    r = _create(service["alpha"], service["file"], phitune={"data": data})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "phitune.data.template", err
    assert "plain" in err["message"] or "column name" in err["message"]


def test_a_learning_rate_of_auto_is_phitunes_own(service):
    r = _create(service["alpha"], service["file"], phitune={"training": {"learning_rate": "auto"}})
    assert r.status_code == 200, r.text


def test_auto_resume_never_deletes_a_directory_that_is_not_its_run(tiny_phi3, chat_files, tmp_path, capsys):
    from helpers import run_cli, write_config

    out = tmp_path / "somebody"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    cfg = write_config(tmp_path / "c.yaml", tiny_phi3, chat_files[0], out, max_steps=1)
    assert run_cli("train", cfg, "--auto-resume") == 2
    assert (out / "thesis.tex").read_text() == "years of work"
    assert "left alone" in capsys.readouterr().err


def test_a_trusted_model_is_the_servers_choice(service):
    schema = service["alpha"].get("/openapi.json").json()
    assert "trust_remote_code" not in json.dumps(schema["components"]["schemas"]["JobCreate"])
    settings = Settings(storage=service["settings"].storage, models=service["settings"].models, trusted=["tiny"])
    from phitune.serve.jobconfig import build_config

    job = Job(
        id="ftjob-x",
        org="alpha",
        model="tiny",
        training_file=service["file"],
        seed=1,
        method={"type": "supervised"},
        hyperparameters={},
        phitune={},
    )
    hyper = {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.0}
    assert build_config(settings, job, hyper).model.trust_remote_code is True
    assert build_config(service["settings"], job, hyper).model.trust_remote_code is False


def test_the_manual_lists_exactly_the_job_options():
    from helpers import REPO

    text = (REPO / "docs" / "reference" / "job-options.md").read_text()
    table = text.split("<!-- generated: job-options -->")[1].split("<!-- /generated -->")[0]
    listed = {}
    for line in table.strip().splitlines()[2:]:
        section, keys = [c.strip() for c in line.strip("|").split("|")]
        listed[section.strip("`")] = tuple(k.strip() for k in keys.split(","))
    assert listed == TENANT
