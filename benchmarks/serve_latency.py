"""The service under load: read latency with 32 concurrent clients while a job trains, and listing
with 10,000 queued jobs.

    python benchmarks/serve_latency.py [--seconds 20] [--clients 32]
    # writes benchmarks/results/serve_latency.{md,json}

Part 1: `phitune serve` (SQLite, embedded worker) trains a tiny model while 32 threads, each with
its own HTTP connection, loop over retrieve job / list events / list files / list models for
`--seconds`; p50 / p99 per endpoint and overall. Part 2: the API alone (--no-worker) over a
database holding 10,000 queued jobs (inserted directly), against the same with 10: latency of the
first page, a page deep in the list (after=), and retrieve.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import http.client

import openai

REPO = Path(__file__).resolve().parents[1]


def start(storage: Path, model: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    from phitune.distributed import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "phitune", "serve", "--storage", str(storage), "--model", f"tiny={model}",
                             "--port", str(port), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(200):
        try:
            Http(port).get("/v1/models")
            return proc, url
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


class Http:
    """One keep-alive connection (a client of its own), JSON GETs, the latency of each."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def get(self, path: str) -> tuple[int, dict]:
        self.conn.request("GET", path, headers={"Authorization": "Bearer x"})
        r = self.conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def under_training(model: Path, seconds: float, clients: int) -> dict:
    storage = Path(tempfile.mkdtemp(prefix="phitune-serve-bench-"))
    proc, url = start(storage, model)
    sdk = openai.OpenAI(base_url=url, api_key="x")
    port = port_of(url)
    try:
        data = (REPO / "examples/data/support_train.jsonl").read_text().splitlines()[:40]
        upload = storage / "t.jsonl"
        upload.write_text("\n".join(data) + "\n")
        f = sdk.files.create(file=upload.open("rb"), purpose="fine-tune")
        job = sdk.fine_tuning.jobs.create(model="tiny", training_file=f.id, hyperparameters={"n_epochs": 50},
                                          extra_body={"phitune": {"training": {"learning_rate": 3e-3}}})
        while sdk.fine_tuning.jobs.retrieve(job.id).status != "running":
            time.sleep(0.2)
        time.sleep(3)  # training under way
        paths = {"retrieve job": f"/v1/fine_tuning/jobs/{job.id}", "list events": f"/v1/fine_tuning/jobs/{job.id}/events?limit=20",
                 "list files": "/v1/files", "list models": "/v1/models"}
        times: dict[str, list[float]] = {k: [] for k in paths}
        errors = []
        deadline = time.time() + seconds

        def client() -> None:
            http_ = Http(port)
            while time.time() < deadline:
                for name, path in paths.items():
                    t = time.perf_counter()
                    code, _ = http_.get(path)
                    times[name].append(time.perf_counter() - t)
                    if code != 200:
                        errors.append(code)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        status = sdk.fine_tuning.jobs.retrieve(job.id).status
        steps = [e for e in sdk.fine_tuning.jobs.list_events(job.id, limit=10000).data if e.type == "metrics"]
        sdk.fine_tuning.jobs.cancel(job.id)
    finally:
        stop(proc)
    every = [x for v in times.values() for x in v]
    return {"clients": clients, "seconds": seconds, "requests": len(every), "errors": len(errors),
            "job_status_after": status, "steps_trained_meanwhile": len(steps),
            "per_endpoint_ms": {k: {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "n": len(v)} for k, v in times.items()},
            "all_ms": {"p50": pct(every, 0.5), "p99": pct(every, 0.99)}}


def many_jobs(model: Path, count: int, repeats: int = 200) -> dict:
    from phitune.serve.db import Job, connect, new_id

    storage = Path(tempfile.mkdtemp(prefix="phitune-serve-jobs-"))
    storage.mkdir(exist_ok=True)
    _, sessions, _ = connect(f"sqlite:///{storage / 'phitune.db'}")
    ids = []
    with sessions() as db:
        for i in range(count):
            job = Job(id=new_id("ftjob"), org="local", model="tiny", training_file="file-x", status="queued",
                      method={"type": "supervised"}, hyperparameters={}, phitune={}, meta={"i": str(i)})
            ids.append(job.id)
            db.add(job)
        db.commit()
    proc, url = start(storage, model, "--no-worker")
    out = {}
    try:
        http_ = Http(port_of(url))
        middle = ids[len(ids) // 2]
        for name, path in (("first page (limit 20)", "/v1/fine_tuning/jobs?limit=20"),
                           ("page after the middle job", f"/v1/fine_tuning/jobs?limit=20&after={middle}"),
                           ("retrieve", f"/v1/fine_tuning/jobs/{middle}")):
            lat = []
            for _ in range(repeats):
                t = time.perf_counter()
                code, _ = http_.get(path)
                lat.append(time.perf_counter() - t)
                assert code == 200, code
            out[name] = {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}
        # Page through everything once, as the SDK's auto-pagination does.
        t, seen, after = time.perf_counter(), 0, None
        while True:
            _, page = http_.get("/v1/fine_tuning/jobs?limit=100" + (f"&after={after}" if after else ""))
            seen += len(page["data"])
            if not page["has_more"]:
                break
            after = page["data"][-1]["id"]
        out["list all (pages of 100)"] = {"jobs": seen, "seconds": time.perf_counter() - t}
    finally:
        stop(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=32)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="phitune-bench-model-"))
    subprocess.run([sys.executable, "-m", "phitune", "create-model", str(work / "tiny")], check=True, capture_output=True)
    load = under_training(work / "tiny", args.seconds, args.clients)
    small, large = many_jobs(work / "tiny", 10), many_jobs(work / "tiny", 10_000)
    result = {"under_training": load, "jobs_10": small, "jobs_10000": large}
    out = REPO / "benchmarks" / "results"
    (out / "serve_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# phitune serve: read latency under load (SQLite, loopback, 2 CPU cores)", "",
             f"{load['clients']} clients for {load['seconds']:.0f} s while a job trained "
             f"({load['steps_trained_meanwhile']} steps logged, {load['requests']} requests, {load['errors']} errors):", "",
             "| endpoint | p50 ms | p99 ms | requests |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['p50']:.1f} | {v['p99']:.1f} | {v['n']} |" for k, v in load["per_endpoint_ms"].items()]
    lines += [f"| **all** | **{load['all_ms']['p50']:.1f}** | **{load['all_ms']['p99']:.1f}** | |", "",
              "Queued jobs held and listed (API only, one client, 200 requests each):", "",
              "| request | 10 jobs p50 / p99 ms | 10,000 jobs p50 / p99 ms |", "|---|---|---|"]
    for k in small:
        if "p50" in small[k]:
            lines.append(f"| {k} | {small[k]['p50']:.1f} / {small[k]['p99']:.1f} | {large[k]['p50']:.1f} / {large[k]['p99']:.1f} |")
    lines += [f"| list all, pages of 100 | {small['list all (pages of 100)']['seconds']:.2f} s | "
              f"{large['list all (pages of 100)']['seconds']:.2f} s ({large['list all (pages of 100)']['jobs']} jobs) |", ""]
    (out / "serve_latency.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
