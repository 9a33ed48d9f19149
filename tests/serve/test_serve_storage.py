"""What the service keeps on disk, in process (the app on a TestClient, the worker's sync called
directly): a per-organization quota on files and runs, checkpoint rotation that the checkpoint
objects follow, a deleted model's weights gone, uploads cut off by a kill recovered or removed,
and file checks that read a bounded sample, a few at a time."""

import json
import os
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from phitune.outputs import checkpoint_dir  # noqa: E402
from phitune.serve import filecheck  # noqa: E402
from phitune.serve.app import create_app  # noqa: E402
from phitune.serve.db import ApiKey, Checkpoint, File, Job, new_id  # noqa: E402
from phitune.serve.deps import hash_key  # noqa: E402
from phitune.serve.jobconfig import build_config  # noqa: E402
from phitune.serve.settings import Settings  # noqa: E402
from phitune.serve.storage import partial_path, recover  # noqa: E402
from phitune.serve.worker import Worker  # noqa: E402

ROW = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n"


@pytest.fixture
def service(tiny_phi3, tmp_path):
    settings = Settings(storage=tmp_path / "store", models={"tiny": str(tiny_phi3)}, org_quota_bytes=4096)
    app = create_app(settings)
    with app.state.sessions() as db:
        db.add_all([ApiKey(org="alpha", key_hash=hash_key("key-a")), ApiKey(org="beta", key_hash=hash_key("key-b"))])
        db.commit()
    clients = {org: TestClient(app, headers={"Authorization": f"Bearer key-{org[0]}"}) for org in ("alpha", "beta")}
    return {"app": app, "settings": settings, **clients}


def upload(client, data: bytes):
    return client.post("/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"})


def test_an_organization_stays_within_its_quota(service):
    a, b = service["alpha"], service["beta"]
    first = upload(a, ROW.encode() * 30)  # ~2.6 KB of the 4 KB
    assert first.status_code == 200, first.text
    over = upload(a, ROW.encode() * 30)
    err = over.json()["error"]
    assert over.status_code == 403 and err["code"] == "storage_quota_exceeded" and "--org-quota-mb" in err["message"]
    assert upload(b, ROW.encode() * 30).status_code == 200  # another organization has its own quota
    # Runs count too: a job's run directory fills the rest; then no new file and no new job.
    job = a.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": first.json()["id"]})
    assert job.status_code == 200, job.text
    run = service["settings"].run_dir(job.json()["id"])
    run.mkdir(parents=True)
    (run / "weights.bin").write_bytes(b"x" * 2000)
    refused = a.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": first.json()["id"]})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "storage_quota_exceeded"
    assert upload(a, b"{}\n").status_code == 403
    assert a.delete(f"/v1/files/{first.json()['id']}").status_code == 200  # deleting makes room
    assert upload(a, ROW.encode()).status_code == 200
    # Nothing of a refused upload is kept.
    stored = {p.name for p in service["settings"].files_dir.iterdir()}
    assert all(not name.endswith(".partial") for name in stored)


def test_checkpoints_rotate_and_their_objects_follow(service, tmp_path):
    settings = service["settings"]
    f = upload(service["alpha"], ROW.encode() * 4).json()
    body = {"model": "tiny", "training_file": f["id"], "validation_file": f["id"]}
    job_id = service["alpha"].post("/v1/fine_tuning/jobs", json=body).json()["id"]
    with service["app"].state.sessions() as db:
        job = db.query(Job).filter(Job.id == job_id).one()
    cfg = build_config(settings, job, {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.0})
    assert cfg.training.save_total_limit == 3 and cfg.training.keep_best  # the newest 3 and the best
    root = settings.run_dir(job_id) / "checkpoints"
    for step in (10, 20):
        (checkpoint_dir(root, step) / "adapter").mkdir(parents=True)
    settings.org_quota_bytes = None
    worker = Worker(settings, service["app"].state.sessions)
    worker.sync(job, "ft:tiny:alpha::x", time.time())
    (checkpoint_dir(root, 10) / "adapter").rmdir()  # rotated out by the trainer
    checkpoint_dir(root, 10).rmdir()
    (checkpoint_dir(root, 30) / "adapter").mkdir(parents=True)
    worker.sync(job, "ft:tiny:alpha::x", time.time())
    with service["app"].state.sessions() as db:
        rows = {c.step: c.deleted for c in db.query(Checkpoint).filter(Checkpoint.job_id == job_id)}
    assert rows == {10: True, 20: False, 30: False}
    listed = service["alpha"].get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert sorted(c["step_number"] for c in listed) == [20, 30]


def test_a_running_job_past_the_quota_is_stopped(service):
    settings = service["settings"]
    f = upload(service["alpha"], ROW.encode() * 4).json()
    job_id = (
        service["alpha"].post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": f["id"]}).json()["id"]
    )
    with service["app"].state.sessions() as db:
        db.query(Job).filter(Job.id == job_id).update({"status": "running", "worker": "w", "heartbeat": time.time()})
        db.commit()
        job = db.query(Job).filter(Job.id == job_id).one()
    big = checkpoint_dir(settings.run_dir(job_id) / "checkpoints", 10) / "adapter"
    big.mkdir(parents=True)
    (big / "adapter_model.safetensors").write_bytes(b"x" * 8192)
    worker = Worker(settings, service["app"].state.sessions)
    asked = worker.sync(job, "ft:tiny:alpha::x", time.time())
    assert asked == "quota"
    worker.conclude(job, "ft:tiny:alpha::x", -15, asked, stopping=False)
    with service["app"].state.sessions() as db:
        job = db.query(Job).filter(Job.id == job_id).one()
    assert job.status == "failed" and job.error["code"] == "storage_quota_exceeded", job.error


def test_deleting_a_fine_tuned_model_removes_its_weights(service):
    settings = service["settings"]
    settings.org_quota_bytes = None
    f = upload(service["alpha"], ROW.encode() * 4).json()
    job_id = (
        service["alpha"].post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": f["id"]}).json()["id"]
    )
    run = settings.run_dir(job_id)
    for part in ("adapter", "checkpoints/step-000010/adapter", "best"):
        (run / part).mkdir(parents=True)
        (run / part / "w").write_bytes(b"w")
    (run / "metrics.jsonl").write_text("{}\n")
    name = f"ft:tiny:alpha::{job_id[6:14]}"
    with service["app"].state.sessions() as db:
        db.query(Job).filter(Job.id == job_id).update({"status": "succeeded", "fine_tuned_model": name})
        db.commit()
    assert service["beta"].delete(f"/v1/models/{name}").status_code == 404 and (run / "adapter").is_dir()
    assert service["alpha"].delete(f"/v1/models/{name}").json()["deleted"] is True
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]  # the record stays, the weights go


def test_uploads_cut_off_by_a_kill_are_recovered_or_removed(service):
    settings = service["settings"]
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    committed, orphan, fresh, stray = (new_id("file") for _ in range(4))
    with service["app"].state.sessions() as db:
        db.add(File(id=committed, org="alpha", filename="a.jsonl", purpose="fine-tune", bytes=4))
        db.commit()
    for file_id in (committed, orphan, fresh):
        partial_path(settings.file_path(file_id)).write_bytes(b"data")
    settings.file_path(stray).write_bytes(b"no row")
    old = time.time() - 3600
    for path in (partial_path(settings.file_path(orphan)), settings.file_path(stray)):
        os.utime(path, (old, old))
    recover(settings, service["app"].state.sessions)
    names = sorted(p.name for p in settings.files_dir.iterdir())
    # The committed one is finished; the old orphan and the stray file are gone; one written a
    # moment ago may still be an upload in flight (another server on this storage) and stays.
    assert names == sorted([f"{committed}.jsonl", f"{fresh}.jsonl.partial"])


def test_a_file_check_reads_a_bounded_sample_a_few_at_a_time(service, monkeypatch):
    settings = service["settings"]
    settings.org_quota_bytes = None
    f = upload(service["alpha"], ROW.encode() * 40).json()
    monkeypatch.setattr(filecheck, "CHECK_BYTES", len(ROW) * 10 + 5)
    check = service["alpha"].get(f"/v1/files/{f['id']}/check", params={"model": "tiny"}).json()
    assert check["sampled"] and check["checked_bytes"] == len(ROW) * 10 and check["examples"] == 10, check
    assert not list((settings.storage / "checks").iterdir())  # the sample is gone
    monkeypatch.setattr(filecheck, "CHECK_WAIT", 0.1)
    held = [filecheck._CHECKS.acquire() for _ in range(filecheck.MAX_CHECKS)]
    try:
        busy = service["alpha"].get(f"/v1/files/{f['id']}/check", params={"model": "tiny"})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
    finally:
        for _ in held:
            filecheck._CHECKS.release()


def test_a_gguf_download_is_built_once_within_the_quota_and_goes_with_the_model(service, tiny_phi3):
    """GET /v1/fine_tuning/jobs/{id}/gguf: refused past the quota before anything is built; built
    into the job's run directory once and served from there; another organization's job is a 404;
    deleting the model deletes the file."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    settings, a, b = service["settings"], service["alpha"], service["beta"]
    settings.org_quota_bytes = None
    f = upload(a, ROW.encode() * 4).json()
    job_id = a.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": f["id"]}).json()["id"]
    run = settings.run_dir(job_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_phi3)
    get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)).save_pretrained(
        run / "adapter"
    )
    name = f"ft:tiny:alpha::{job_id[6:14]}"
    path = f"/v1/fine_tuning/jobs/{job_id}/gguf"
    assert a.get(path).status_code == 400  # not succeeded yet: no model to export
    with service["app"].state.sessions() as db:
        db.query(Job).filter(Job.id == job_id).update({"status": "succeeded", "fine_tuned_model": name})
        db.commit()
    settings.org_quota_bytes = 1024  # the adapter alone is past it
    refused = a.get(path)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "storage_quota_exceeded"
    assert not (run / "gguf").exists()
    settings.org_quota_bytes = None
    # A page on another site cannot make the server build (the guard treats this GET as a change).
    for header in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://elsewhere.example"}):
        foreign = a.get(path, headers=header)
        assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "cross_origin_refused"
    assert not (run / "gguf").exists()
    assert b.get(path).status_code == 404
    bad = a.get(path, params={"quant": "q4"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "quant"
    first = a.get(path, params={"quant": "f16"})
    assert first.status_code == 200 and first.content[:4] == b"GGUF", first.text[:300]
    assert "attachment" in first.headers["content-disposition"] and "-f16.gguf" in first.headers["content-disposition"]
    stored = run / "gguf" / "f16.gguf"
    built = stored.stat().st_mtime_ns
    assert a.get(path, params={"quant": "f16"}).content == first.content and stored.stat().st_mtime_ns == built
    assert sorted(p.name for p in (run / "gguf").iterdir()) == ["f16.gguf"]  # no build directory left
    assert a.delete(f"/v1/models/{name}").json()["deleted"] is True
    assert not (run / "gguf").exists()
