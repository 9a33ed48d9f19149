"""The web portal through the app, without a browser: every page is a shell with no tenant data
and no outside URL, every fragment and action needs the key and stays inside its organization,
files are checked with their lines and shown as text, form errors land next to their field, and
the event stream replays exactly what a reconnecting client missed. (The browser tests, on a real
server, are in test_portal_browser.py.)"""

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from phitune.serve.app import create_app  # noqa: E402
from phitune.serve.db import ApiKey  # noqa: E402
from phitune.serve.deps import hash_key  # noqa: E402
from phitune.serve.portal.forms import job_request  # noqa: E402
from phitune.serve.portal.pages import PAGES  # noqa: E402
from phitune.serve.settings import Settings  # noqa: E402
from phitune.serve.worker import Worker  # noqa: E402

STATIC = Path(__file__).parents[2] / "src/phitune/serve/portal/static"
HOSTILE = "<script>alert('x')</script>"


def rows(n: int, reply: str = "a") -> bytes:
    return "".join(
        json.dumps(
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"{reply}{i}"}]}
        )
        + "\n"
        for i in range(n)
    ).encode()


@pytest.fixture(scope="module")
def portal(tiny_phi3, tmp_path_factory):
    settings = Settings(storage=tmp_path_factory.mktemp("portal"), models={"tiny": str(tiny_phi3)}, poll_seconds=0.05)
    app = create_app(settings)
    with app.state.sessions() as db:
        db.add_all([ApiKey(org="alpha", key_hash=hash_key("key-a")), ApiKey(org="beta", key_hash=hash_key("key-b"))])
        db.commit()
    clients = {org: TestClient(app, headers={"Authorization": f"Bearer key-{org[0]}"}) for org in ("alpha", "beta")}
    clients["anonymous"] = TestClient(app)
    return settings, clients


def upload(client, data: bytes, name: str = "train.jsonl") -> str:
    r = client.post("/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def create(client, training_file: str, **form) -> str:
    r = client.post("/portal/jobs", data={"model": "tiny", "training_file": training_file, **form})
    assert r.status_code == 200 and "HX-Redirect" in r.headers, r.text
    return r.headers["HX-Redirect"].rsplit("/", 1)[1]


def test_pages_are_shells_served_with_their_assets_and_no_outside_url(portal):
    _, clients = portal
    anonymous = clients["anonymous"]
    for path in [*PAGES, "/jobs/ftjob-anything"]:
        r = anonymous.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        assert "script-src" not in r.headers["content-security-policy"]  # default-src 'self': no inline, no CDN
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert not re.search(r"(src|href)=\"(https?:)?//", r.text), path  # nothing from another host
        for asset in re.findall(r"(?:src|href)=\"(/static/[^\"]+)\"", r.text):
            assert anonymous.get(asset).status_code == 200, asset
    for own in ("portal.js", "portal.css"):
        assert not re.search(r"https?://", (STATIC / own).read_text()), own
    docs = anonymous.get("/docs").text
    assert "/static/swagger/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert anonymous.get("/redoc").status_code == 404
    # A job id in the URL is text, not markup
    assert "&lt;b&gt;" in anonymous.get("/jobs/<b>x").text


def test_every_fragment_and_action_needs_the_key(portal):
    _, clients = portal
    anonymous = clients["anonymous"]
    gets = [
        "/portal/jobs",
        "/portal/jobs/x/summary",
        "/portal/jobs/x/checkpoints",
        "/portal/options/models",
        "/portal/options/files",
        "/portal/files/check?training_file=x&model=tiny",
        "/portal/models",
        "/portal/compare/choices",
        "/portal/compare/table?jobs=x",
        "/v1/fine_tuning/jobs/x/events/stream",
        "/v1/files/x/check?model=tiny",
    ]
    for path in gets:
        r = anonymous.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    for path in [
        "/portal/jobs",
        "/portal/jobs/request",
        "/portal/jobs/x/cancel",
        "/portal/jobs/x/pause",
        "/portal/jobs/x/resume",
    ]:
        assert anonymous.post(path, data={"model": "tiny"}).status_code == 401, path
    assert anonymous.delete("/portal/models/ft:tiny:alpha::x").status_code == 401
    big = clients["alpha"].post("/portal/jobs/request", data={"suffix": "x" * 70000})
    assert big.status_code == 413 and "larger than" in big.json()["error"]["message"]
    wrong = TestClient(clients["alpha"].app, headers={"Authorization": "Bearer nope"})
    assert wrong.get("/portal/jobs").status_code == 401
    # A cookie is no key: a page elsewhere cannot act through the browser's cookies
    assert anonymous.post("/portal/jobs/x/cancel", cookies={"Authorization": "Bearer key-a"}).status_code == 401


def test_a_file_is_checked_with_its_lines_and_shown_as_text(portal):
    settings, clients = portal
    alpha = clients["alpha"]
    bad = (
        rows(2) + b"{not json\n" + json.dumps({"messages": [{"role": "user", "content": "no reply"}]}).encode() + b"\n"
    )
    bad_id = upload(alpha, bad)
    check = alpha.get(f"/v1/files/{bad_id}/check", params={"model": "tiny"}).json()
    assert not check["valid"] and check["examples"] == 2
    lines = {p["line"] for p in check["errors"]}
    assert lines == {3, 4}, check["errors"]
    assert str(settings.storage) not in json.dumps(check)  # no server path shown
    html = alpha.get("/portal/files/check", params={"training_file": bad_id, "model": "tiny"}).text
    assert "line 3" in html and "line 4" in html and "invalid JSON" in html

    hostile = (
        json.dumps(
            {"messages": [{"role": "user", "content": HOSTILE}, {"role": "assistant", "content": "trained reply"}]}
        ).encode()
        + b"\n"
    )
    good_id = upload(alpha, hostile * 3, name="<img src=x onerror=alert(1)>.jsonl")
    check = alpha.get(f"/v1/files/{good_id}/check", params={"model": "tiny", "examples": 2}).json()
    assert check["valid"] and len(check["preview"]) == 2
    ex = check["preview"][0]
    trained = "".join(s["text"] for s in ex["segments"] if s["trained"])
    context = "".join(s["text"] for s in ex["segments"] if not s["trained"])
    assert "trained reply" in trained and HOSTILE in context and "trained reply" not in context
    assert ex["trained_tokens"] < ex["tokens"]
    html = alpha.get("/portal/files/check", params={"training_file": good_id, "model": "tiny"}).text
    assert "<script>" not in html and "&lt;script&gt;" in html and 'class="trained"' in html
    assert alpha.get("/portal/options/models", params={"kind": "all", "none": 1}).text.startswith(
        '<option value="">none</option>'
    )  # the playground's second and third model may stay empty
    options = alpha.get("/portal/options/files").text
    assert "<img" not in options and "&lt;img src=x" in options  # the uploaded name, escaped
    # Another organization's file, an unknown model, a bad count: the API's errors
    assert clients["beta"].get(f"/v1/files/{good_id}/check", params={"model": "tiny"}).status_code == 404
    r = alpha.get(f"/v1/files/{good_id}/check", params={"model": "../etc"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert alpha.get(f"/v1/files/{good_id}/check", params={"model": "tiny", "examples": 99}).status_code == 400
    assert "not served here" in alpha.get("/portal/files/check", params={"training_file": good_id, "model": "x"}).text


def test_the_form_sends_the_request_it_shows_and_errors_land_by_their_field(portal):
    _, clients = portal
    alpha = clients["alpha"]
    file_id = upload(alpha, rows(12))
    form = {
        "model": "tiny",
        "training_file": file_id,
        "method": "dora",
        "n_epochs": "2",
        "suffix": "mine",
        "seed": "7",
        "metadata": "team=nlp\nrun=a",
        "batch_size": "auto",
        "beta": "0.3",
    }
    shown = alpha.post("/portal/jobs/request", data=form).text
    body = json.loads(re.search(r'<pre id="request-json">(.*?)</pre>', shown, re.S)[1].replace("&#34;", '"'))
    assert (
        body
        == job_request(form)
        == {
            "model": "tiny",
            "training_file": file_id,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
            "suffix": "mine",
            "seed": 7,
            "metadata": {"team": "nlp", "run": "a"},
            "phitune": {"method": {"name": "dora"}},
        }
    )
    job_id = create(alpha, file_id, **{k: v for k, v in form.items() if k not in ("model", "training_file")})
    job = alpha.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["seed"] == 7 and job["metadata"] == {"team": "nlp", "run": "a"} and job["user_provided_suffix"] == "mine"
    assert job["method"]["supervised"]["hyperparameters"]["n_epochs"] == 2

    def error_at(field: str, **bad) -> str:
        r = alpha.post("/portal/jobs", data={"model": "tiny", "training_file": file_id, **bad})
        assert r.status_code == 200 and "HX-Redirect" not in r.headers, r.text
        errors = dict(re.findall(r'id="error-(\w+)"[^>]*>([^<]*)<', r.text))
        assert errors[field], (field, errors)
        assert not any(v for k, v in errors.items() if k != field), errors
        return errors[field]

    assert "not served here" in error_at("model", model="other")
    assert "n_epochs" in error_at("n_epochs", n_epochs="0")
    assert "learning_rate_multiplier" in error_at("learning_rate_multiplier", learning_rate_multiplier="fast")
    assert "seed" in error_at("seed", seed="-1")
    assert "file-nope" in error_at("training_file", training_file="file-nope")
    assert "metadata" in error_at("metadata", metadata="no equals sign")
    other = upload(clients["beta"], rows(12))
    assert "No file found" in error_at("training_file", training_file=other)  # beta's file is not alpha's
    assert "HX-Redirect" not in alpha.post("/portal/jobs", data={"model": "tiny", "training_file": HOSTILE}).headers


def test_job_list_filters_actions_and_isolation(portal):
    settings, clients = portal
    alpha, beta = clients["alpha"], clients["beta"]
    file_id = upload(alpha, rows(12))
    broken = upload(alpha, b'{"messages": []}\n')
    first = create(alpha, file_id, metadata="team=vision")
    second = create(alpha, broken, suffix="broken")
    worker = Worker(settings, clients["alpha"].app.state.sessions)
    while worker.validate_next():
        pass
    listed = alpha.get("/portal/jobs").text
    assert first in listed and second in listed
    failed = alpha.get("/portal/jobs", params={"status": "failed"}).text
    assert second in failed and first not in failed and "messages" in failed  # the reason stays visible
    assert first in alpha.get("/portal/jobs", params={"meta_key": "team", "meta_value": "vision"}).text
    assert second not in alpha.get("/portal/jobs", params={"meta_key": "team", "meta_value": "vision"}).text
    assert first not in beta.get("/portal/jobs").text and "No jobs yet" in beta.get("/portal/jobs").text
    assert beta.get(f"/portal/jobs/{first}/summary").status_code == 404
    assert "No fine-tuning job found" in beta.post(f"/portal/jobs/{first}/cancel").text
    assert alpha.get(f"/v1/fine_tuning/jobs/{first}").json()["status"] == "queued"  # beta changed nothing

    r = alpha.post(f"/portal/jobs/{first}/pause")
    assert r.headers["HX-Trigger"] == "jobs-changed" and "pause requested" in r.text
    assert alpha.get(f"/v1/fine_tuning/jobs/{first}").json()["status"] == "paused"
    assert "Resume" in alpha.get(f"/portal/jobs/{first}/summary").text
    assert "only a paused job" in alpha.post(f"/portal/jobs/{second}/resume").text  # the API's refusal, shown
    alpha.post(f"/portal/jobs/{first}/resume")
    alpha.post(f"/portal/jobs/{first}/cancel")
    assert alpha.get(f"/v1/fine_tuning/jobs/{first}").json()["status"] == "cancelled"
    assert "already cancelled" in alpha.post(f"/portal/jobs/{first}/cancel").text
    assert alpha.post(f"/portal/jobs/{first}/explode").status_code == 400
    assert "data-download-url" not in alpha.get(f"/portal/jobs/{first}/summary").text  # no model, no GGUF
    from sqlalchemy import select

    from phitune.serve.db import Job

    with alpha.app.state.sessions() as db:  # a succeeded job's page offers its model as GGUF downloads
        job = db.scalar(select(Job).where(Job.id == first))
        job.status, job.fine_tuned_model = "succeeded", "ft:tiny:alpha::x"
        db.commit()
    summary = alpha.get(f"/portal/jobs/{first}/summary").text
    assert f'data-download-url="/v1/fine_tuning/jobs/{first}/gguf?quant=q8_0"' in summary


def parse_stream(text: str) -> list[dict]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        out.append({"id": fields.get("id"), "event": fields["event"], "data": json.loads(fields["data"])})
    return out


def test_a_run_streams_its_whole_history_and_a_reconnect_gets_what_it_missed(portal):
    settings, clients = portal
    alpha, beta = clients["alpha"], clients["beta"]
    train, val = upload(alpha, rows(20)), upload(alpha, rows(4, reply="b"))
    job_id = create(alpha, train, validation_file=val, n_epochs="2", batch_size="4", seed="1")
    worker = Worker(settings, clients["alpha"].app.state.sessions)
    while worker.step():
        if alpha.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] in ("succeeded", "failed"):
            break
    job = alpha.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    assert beta.get(f"/v1/fine_tuning/jobs/{job_id}/events/stream").status_code == 404

    whole = parse_stream(alpha.get(f"/v1/fine_tuning/jobs/{job_id}/events/stream").text)
    events = [m for m in whole if m["id"]]
    listed = alpha.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"][::-1]
    assert [m["id"] for m in events] == [e["id"] for e in listed]  # every event, oldest first
    assert whole[-1]["event"] == "end" and whole[-1]["data"]["status"] == "succeeded"
    metrics = [m["data"]["data"] for m in events if m["event"] == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert all(m["epoch"] is not None for m in metrics) and metrics[-1]["epoch"] == pytest.approx(2.0)
    assert any(m["valid_loss"] is not None for m in metrics)  # validation on the same curve
    middle = events[len(events) // 2]["id"]
    rest = parse_stream(
        alpha.get(f"/v1/fine_tuning/jobs/{job_id}/events/stream", headers={"Last-Event-ID": middle}).text
    )
    assert [m["id"] for m in rest if m["id"]] == [m["id"] for m in events[len(events) // 2 + 1 :]]
    r = alpha.get(f"/v1/fine_tuning/jobs/{job_id}/events/stream", params={"after": "ftevent-unknown"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"

    summary = alpha.get(f"/portal/jobs/{job_id}/summary").text
    assert "step_metrics.csv" in summary and job["fine_tuned_model"] in summary
    checkpoints = alpha.get(f"/portal/jobs/{job_id}/checkpoints").text
    assert 'data-step="10"' in checkpoints, checkpoints
    assert ":ckpt-step-" in checkpoints

    # Compare: a second run with another seed; the table tells what differs
    other = create(alpha, train, n_epochs="1", batch_size="4", seed="2")
    worker.step()
    worker.step()
    table = alpha.get("/portal/compare/table", params=[("jobs", job_id), ("jobs", other)]).text
    assert re.search(r'<tr class="differs">\s*<th scope="row">seed</th>', table)
    assert re.search(r'<tr class="same">\s*<th scope="row">model</th>', table)
    assert "final train_loss" in table
    assert beta.get("/portal/compare/table", params=[("jobs", job_id)]).status_code == 404

    # Models: the fine-tune is listed with its checkpoints, and deleting it removes both
    models = alpha.get("/portal/models").text
    assert job["fine_tuned_model"] in models and "checkpoint" in models
    assert job["fine_tuned_model"] not in beta.get("/portal/models").text
    assert "not" in beta.delete(f"/portal/models/{job['fine_tuned_model']}").text.lower()
    r = alpha.delete(f"/portal/models/{job['fine_tuned_model']}")
    assert "deleted" in r.text and r.headers["HX-Trigger"] == "models-changed"
    assert job["fine_tuned_model"] not in alpha.get("/portal/models").text
    assert "base model" in alpha.delete("/portal/models/tiny").text


def test_a_streamed_chat_can_end_with_its_usage(portal):
    _, clients = portal
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    plain = clients["alpha"].post("/v1/chat/completions", json=body).text
    assert '"usage"' not in plain
    text = clients["alpha"].post("/v1/chat/completions", json=body | {"stream_options": {"include_usage": True}}).text
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert chunks[-1]["usage"]["prompt_tokens"] > 0
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) >= 1
