"""The service under load: read latency with 32 concurrent clients while a job trains, and listing
with 10,000 queued jobs.

    apt-get install wrk   # the load generator
    python benchmarks/serve_latency.py [--seconds 20] [--clients 32] [--api-processes 1 2]
    # writes benchmarks/results/serve_latency.{md,json}

Part 1, once per --api-processes value, side by side in one run: `phitune serve` (SQLite, its
built-in worker) trains a tiny model while wrk keeps 32 connections busy for `--seconds`, cycling
through retrieve job / list events / list files / list models; p50 / p90 / p99 / max over all
requests. Part 2: the API alone (--no-worker) over a database holding 10,000 queued jobs
(inserted directly), against the same with 10: latency of the first page, a page deep in the list
(after=), and retrieve.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
from _serve import start_serve

REPO = Path(__file__).resolve().parents[1]


def start(storage: Path, model: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc, port = start_serve(storage, f"tiny={model}", *extra)
    return proc, f"http://127.0.0.1:{port}/v1"


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


WRK_SCRIPT = """
paths = {%s}
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", paths[(counter %% #paths) + 1], {["Authorization"] = "Bearer x"})
end
done = function(summary, latency, requests)
  io.write(string.format('WRK {"requests": %%d, "non_2xx": %%d, "socket_errors": %%d, "p50": %%f, "p90": %%f, ' ..
    '"p99": %%f, "max": %%f}\\n', summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
"""


def wrk(port: int, paths: list[str], clients: int, seconds: float) -> dict:
    """`clients` keep-alive connections, each sending its next request as soon as the last one
    is answered (closed loop, no pause), cycling through `paths`. wrk is C: the load generator
    does not compete with the server for the GIL, and its latency histogram is exact."""
    script = Path(tempfile.mkdtemp()) / "paths.lua"
    script.write_text(WRK_SCRIPT % ", ".join(json.dumps(p) for p in paths))
    out = subprocess.run(
        ["wrk", "-t2", f"-c{clients}", f"-d{seconds:.0f}s", "-s", str(script), f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.split("WRK ", 1)[1])


def under_training(model: Path, seconds: float, clients: int, api_processes: int) -> dict:
    storage = Path(tempfile.mkdtemp(prefix="phitune-serve-bench-"))
    proc, url = start(storage, model, "--api-processes", str(api_processes))
    sdk = openai.OpenAI(base_url=url, api_key="x")
    try:
        data = (REPO / "examples/data/support_train.jsonl").read_text().splitlines()[:40]
        upload = storage / "t.jsonl"
        upload.write_text("\n".join(data) + "\n")
        f = sdk.files.create(file=upload.open("rb"), purpose="fine-tune")
        job = sdk.fine_tuning.jobs.create(
            model="tiny",
            training_file=f.id,
            hyperparameters={"n_epochs": 50},
            extra_body={"phitune": {"training": {"learning_rate": 3e-3}}},
        )
        while sdk.fine_tuning.jobs.retrieve(job.id).status != "running":
            time.sleep(0.2)
        time.sleep(3)  # training under way
        quiet = _steps(sdk, job.id)
        time.sleep(10)  # the training speed without clients
        before = _steps(sdk, job.id)
        load = wrk(
            port_of(url),
            [
                f"/v1/fine_tuning/jobs/{job.id}",
                f"/v1/fine_tuning/jobs/{job.id}/events?limit=20",
                "/v1/files",
                "/v1/models",
            ],
            clients,
            seconds,
        )
        status = sdk.fine_tuning.jobs.retrieve(job.id).status
        steps = _steps(sdk, job.id) - before
        sdk.fine_tuning.jobs.cancel(job.id)
    finally:
        stop(proc)
    return {
        "api_processes": api_processes,
        "clients": clients,
        "seconds": seconds,
        **load,
        "requests_per_second": load["requests"] / seconds,
        "job_status_after": status,
        "steps_trained_meanwhile": steps,
        "steps_per_second_quiet": (before - quiet) / 10,
        "steps_per_second_under_load": steps / seconds,
    }


def _steps(sdk, job_id: str) -> int:
    return sum(e.type == "metrics" for e in sdk.fine_tuning.jobs.list_events(job_id, limit=10000).data)


def many_jobs(model: Path, count: int, repeats: int = 200) -> dict:
    from phitune.serve.db import Job, connect, new_id

    storage = Path(tempfile.mkdtemp(prefix="phitune-serve-jobs-"))
    storage.mkdir(exist_ok=True)
    _, sessions, _ = connect(f"sqlite:///{storage / 'phitune.db'}")
    ids = []
    with sessions() as db:
        for i in range(count):
            job = Job(
                id=new_id("ftjob"),
                org="local",
                model="tiny",
                training_file="file-x",
                status="queued",
                method={"type": "supervised"},
                hyperparameters={},
                phitune={},
                meta={"i": str(i)},
            )
            ids.append(job.id)
            db.add(job)
        db.commit()
    proc, url = start(storage, model, "--no-worker")
    out = {}
    try:
        http_ = Http(port_of(url))
        middle = ids[len(ids) // 2]
        for name, path in (
            ("first page (limit 20)", "/v1/fine_tuning/jobs?limit=20"),
            ("page after the middle job", f"/v1/fine_tuning/jobs?limit=20&after={middle}"),
            ("retrieve", f"/v1/fine_tuning/jobs/{middle}"),
        ):
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
    ap.add_argument("--api-processes", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("benchmarks/serve_latency.py needs wrk, the HTTP load generator: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="phitune-bench-model-"))
    subprocess.run(
        [sys.executable, "-m", "phitune", "create-model", str(work / "tiny")], check=True, capture_output=True
    )
    loads = [under_training(work / "tiny", args.seconds, args.clients, n) for n in args.api_processes]
    small, large = many_jobs(work / "tiny", 10), many_jobs(work / "tiny", 10_000)
    result = {"under_training": loads, "jobs_10": small, "jobs_10000": large}
    out = REPO / "benchmarks" / "results"
    (out / "serve_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# phitune serve: read latency under load (SQLite, loopback, 2 CPU cores)",
        "",
        f"{args.clients} clients (wrk, keep-alive, each sending its next request as soon as the last is answered) "
        f"for {args.seconds:.0f} s, cycling through retrieve job / list events / list files / list models, while "
        "a job trained in the same server:",
        "",
        "| API processes | requests/s | p50 ms | p90 ms | p99 ms | max ms | errors | training steps/s: quiet → under "
        "load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['api_processes']} | {r['requests_per_second']:.0f} | {r['p50']:.1f} | {r['p90']:.1f} | "
        f"**{r['p99']:.1f}** | {r['max']:.1f} | {r['non_2xx'] + r['socket_errors']} | "
        f"{r['steps_per_second_quiet']:.1f} → {r['steps_per_second_under_load']:.1f} |"
        for r in loads
    ]
    lines += [
        "",
        "Queued jobs held and listed (API only, one client, 200 requests each):",
        "",
        "| request | 10 jobs p50 / p99 ms | 10,000 jobs p50 / p99 ms |",
        "|---|---|---|",
    ]
    for k in small:
        if "p50" in small[k]:
            lines.append(
                f"| {k} | {small[k]['p50']:.1f} / {small[k]['p99']:.1f} | {large[k]['p50']:.1f} / "
                f"{large[k]['p99']:.1f} |"
            )
    lines += [
        f"| list all, pages of 100 | {small['list all (pages of 100)']['seconds']:.2f} s | "
        f"{large['list all (pages of 100)']['seconds']:.2f} s ({large['list all (pages of 100)']['jobs']} jobs) |",
        "",
    ]
    (out / "serve_latency.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
