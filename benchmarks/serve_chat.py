"""Calling fine-tunes at load: `phitune serve` with the inference engine against the server of
`--baseline` (the commit before the engine: one generation at a time per base, under a lock), on
the real model, side by side in one run.

    python benchmarks/serve_chat.py [--baseline 47c562a] [--seconds 40]
    # writes benchmarks/results/serve_chat.{md,json}

Each row is a fresh server on loopback with the real SmolLM2-135M-Instruct as base model `smol`
and LoRA fine-tunes of it (rank 16 on every linear layer, phitune's default; their weights are
random: what a fine-tune has learned does not change the arithmetic), registered as succeeded
jobs of one organization. Clients are threads, each sending streamed chat completions one after
another (`stream_options.include_usage`), greedy, `max_tokens` 64, prompts of 57-62 tokens with
the chat template; request i of client c goes to model (c + i) mod (fine-tunes + 1), 0 being
the base. Aggregate tokens/s = completion tokens in the window / the window (a request under way
when the window closes counts in proportion to its time inside). TTFT: request sent to first
content chunk; inter-token latency: between content chunks of one stream.

Rows: the baseline server (1 and 16 clients); the engine (1 and 16 clients, base + 4 fine-tunes);
the engine with 64 fine-tunes in rotation through `--max-adapters 8` (hit rate and cold loads
from its /metrics); memory (RSS of each process) with --api-processes 1 and 4; and ONNX Runtime
GenAI on an int4 export of the same model, one stream, the same prompts; and, in the engine's
dtype on this machine, each of 16 requests alone against all of them in one batch (greedy tokens).
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))

from _machine import cpu  # noqa: E402
from _serve import start_serve  # noqa: E402
from real_data import REAL_MODEL  # noqa: E402

QUESTIONS = [
    "I am planning a short trip to Lisbon in the spring with two friends who love food and history. "
    "What three things should we do on our first day there?",
    "Explain in simple words why the sky looks blue during the day but red and orange at sunset, "
    "as you would to a curious ten year old child.",
    "Write a friendly two sentence note to a neighbour thanking them for watering my plants while "
    "I was away for a week in the mountains.",
    "My small vegetable garden gets about four hours of sun a day. Which vegetables would grow well "
    "there, and how often should I water them in summer?",
    "Give me a short checklist for preparing a bicycle for a long weekend ride on country roads, "
    "including what to carry in case something breaks.",
    "Summarise the main idea of supply and demand in economics in a few sentences, with one everyday "
    "example that a student could relate to.",
]


# --- servers -----------------------------------------------------------------------------------


class Server:
    def __init__(self, storage: Path, *extra: str, src: Path | None = None) -> None:
        env = dict(os.environ)
        if src is not None:  # the baseline's source tree on the same interpreter and packages
            env["PYTHONPATH"] = str(src)
        self.proc, self.port = start_serve(storage, f"smol={REAL_MODEL}", "--no-worker", *extra, env=env)

    def metrics(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()

    def processes(self) -> dict[int, str]:
        """pid -> role of the server's processes (supervisor, api, engine)."""
        out = {self.proc.pid: "supervisor"}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                cmd = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if parent == self.proc.pid:
                role = "engine" if b"phitune.inference.server" in cmd else "api" if b"spawn_main" in cmd else None
                if role:
                    out[int(stat.parent.name)] = role
        return out

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_adapters(root: Path, n: int) -> list[Path]:
    """n LoRA adapters of the real model (rank 16, all linear layers, random B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(REAL_MODEL)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    out = []
    for i in range(n):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.002)
        path = root / f"adapter-{i}"
        peft_model.save_pretrained(path)
        out.append(path)
    return out


def register(storage: Path, adapters: list[Path]) -> list[str]:
    """The adapters as succeeded fine-tuning jobs of organization `local` (the keyless loopback
    org): each job's run directory holds its adapter, as a worker leaves it."""
    from phitune.serve.db import Job, connect
    from phitune.serve.settings import Settings

    settings = Settings(storage=storage)
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    _, sessions, _ = connect(settings.db_url)
    names = []
    with sessions() as db:
        for i, adapter in enumerate(adapters):
            job_id = f"ftjob-bench{i:04d}"
            shutil.copytree(adapter, settings.run_dir(job_id) / "adapter")
            name = f"ft:smol:bench-{i}:{job_id}"
            db.add(Job(id=job_id, org="local", status="succeeded", model="smol", training_file="file-x",
                       method={"type": "supervised"}, hyperparameters={}, fine_tuned_model=name))  # fmt: skip
            names.append(name)
        db.commit()
    return names


# --- load --------------------------------------------------------------------------------------


def stream_chat(port: int, model: str, question: str, max_tokens: int) -> dict:
    body = json.dumps({
        "model": model, "messages": [{"role": "user", "content": question}], "stream": True,
        "temperature": 0, "max_tokens": max_tokens, "stream_options": {"include_usage": True},
    })  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        return {"error": f"{resp.status} {resp.read()[:200]!r}"}
    stamps, usage, error = [], None, None
    while True:
        line = resp.readline()
        if not line:
            break
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            error = event["error"]["message"]
        elif event.get("usage"):
            usage = event["usage"]
        elif event["choices"] and event["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    conn.close()
    if error or usage is None:
        return {"error": error or "no usage"}
    return {
        "sent": sent,
        "ended": time.perf_counter(),
        "ttft": stamps[0] - sent if stamps else None,
        "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
        "tokens": usage["completion_tokens"],
    }


def load(port: int, models: list[str], clients: int, seconds: float, max_tokens: int) -> dict:
    """`clients` threads chatting for `seconds` (a request under way at the end is waited for and
    counted only if it ended inside the window)."""
    results: list[dict] = []
    lock = threading.Lock()
    start = time.perf_counter()
    end = start + seconds

    def client(c: int) -> None:
        i = 0
        while time.perf_counter() < end:
            r = stream_chat(port, models[(c + i) % len(models)], QUESTIONS[(c + i) % len(QUESTIONS)], max_tokens)
            with lock:
                results.append(r)
            i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    gaps = sorted(g for r in ok for g in r["gaps"])
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_error": next((r["error"] for r in results if "error" in r), None),
        "tokens_per_s": round(sum(_inside(r, start, end) for r in ok) / seconds, 1),
        "ttft_p50": _q(ttft, 0.5),
        "ttft_p90": _q(ttft, 0.9),
        "itl_p50": _q(gaps, 0.5),
        "itl_p90": _q(gaps, 0.9),
    }


def _inside(r: dict, start: float, end: float) -> float:
    """A request's tokens in proportion to the part of its life inside the window (the requests
    under way when it closes are finished, not cut off, and count for what fell inside)."""
    life = r["ended"] - r["sent"]
    return r["tokens"] * max(0.0, min(r["ended"], end) - max(r["sent"], start)) / life if life > 0 else 0.0


def _q(values: list[float], q: float) -> float | None:
    return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else None


def warm(port: int, models: list[str]) -> None:
    for m in models:
        r = stream_chat(port, m, QUESTIONS[0], 4)
        if "error" in r:
            raise RuntimeError(f"{m}: {r['error']}")


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# --- ONNX Runtime GenAI --------------------------------------------------------------------------


def onnx_row(max_tokens: int, cache: Path) -> dict:
    out = cache / "smollm2-int4"
    if not (out / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "phitune", "export", "onnx", str(REAL_MODEL), "--output", str(out)],
                       check=True)  # fmt: skip
    from phitune.backends import OnnxBackend

    backend = OnnxBackend(str(out))
    backend.generate_ids(backend.prompt_ids([{"role": "user", "content": "hi"}]), max_new_tokens=4)
    tokens, started = 0, time.perf_counter()
    for q in QUESTIONS:
        tokens += sum(1 for _ in backend.generate_ids(backend.prompt_ids([{"role": "user", "content": q}]),
                                                      max_new_tokens=max_tokens))  # fmt: skip
    return {"tokens_per_s": round(tokens / (time.perf_counter() - started), 1), "tokens": tokens}


# --- bf16: alone vs batched ----------------------------------------------------------------------


def agreement(adapters: list[Path], max_tokens: int) -> dict:
    """Greedy tokens of each request alone against the same request in one batch with the other
    models' requests, in the engine's dtype on this machine (in-process, no server)."""
    import threading

    from phitune.inference.engine import Engine
    from phitune.inference.load import load_model
    from phitune.inference.prompts import prompt_ids
    from phitune.inference.sampling import Sampling

    model, tok = load_model(str(REAL_MODEL))
    engine = Engine(model, tok)
    choices = [None, *map(str, adapters[:4])]
    requests = [(prompt_ids(tok, [{"role": "user", "content": q}]), choices[i % 5])
                for i, q in enumerate(QUESTIONS * 3)][:16]  # fmt: skip

    def run(batch):
        left, handles = threading.Semaphore(0), []
        for ids, adapter in batch:
            sink = lambda e: left.release() if e.kind != "text" else None  # noqa: E731
            handles.append(engine.submit(ids, Sampling(max_tokens=max_tokens), sink, adapter=adapter))
        for _ in batch:
            left.acquire()
        return [list(h._seq.generated) for h in handles]

    try:
        alone = [run([r])[0] for r in requests]
        together = run(requests)
    finally:
        engine.close()
    same = sum(a == b for x, y in zip(alone, together) for a, b in zip(x, y))
    total = sum(max(len(x), len(y)) for x, y in zip(alone, together))
    return {
        "dtype": str(model.dtype).removeprefix("torch."),
        "identical_replies": sum(x == y for x, y in zip(alone, together)),
        "replies": len(requests),
        "token_agreement": round(same / total, 4),
    }


# --- the run -------------------------------------------------------------------------------------


def baseline_tree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)  # fmt: skip
    return where / "src"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="47c562a", help="the commit whose server is today's lock path")
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--skip", nargs="*", default=[], help="rows to leave out: baseline onnx rotation memory agreement"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-chat-"))
    adapters = make_adapters(work / "adapters", 64)
    rows: dict[str, dict] = {}

    def run(label: str, extra: tuple = (), src: Path | None = None, n_models: int = 5, clients=(1, 16)) -> None:
        storage = work / "".join(c if c.isalnum() else "-" for c in label)
        names = register(storage, adapters[: n_models - 1])
        server = Server(storage, *extra, src=src)
        try:
            models = ["smol", *names]
            warm(server.port, models[:5])
            for c in clients:
                rows[f"{label}, {c} client{'s' if c > 1 else ''}"] = load(
                    server.port, models, c, args.seconds, args.max_tokens
                )
                print(label, c, rows[f"{label}, {c} client{'s' if c > 1 else ''}"], flush=True)
            if label == "engine, 64 fine-tunes through a cache of 8":
                text = server.metrics()
                hits = metric(text, "phitune_adapter_cache_hits_total")
                misses = metric(text, "phitune_adapter_cache_misses_total")
                row = rows[f"{label}, 16 clients"]
                row["cache_hit_rate"] = round(hits / max(hits + misses, 1), 3)
                row["cold_loads"] = int(misses)
                row["cold_load_mean_s"] = round(metric(text, "phitune_adapter_load_seconds_sum") / max(misses, 1), 4)
                row["evictions"] = int(metric(text, "phitune_adapter_cache_evictions_total"))
        finally:
            server.stop()

    if "baseline" not in args.skip:
        src = baseline_tree(args.baseline, work / "baseline")
        run("today's lock path", src=src)
    run("engine")
    if "rotation" not in args.skip:
        run("engine, 64 fine-tunes through a cache of 8", ("--max-adapters", "8"), n_models=65, clients=(16,))
    memory = {}
    if "memory" not in args.skip:
        for processes in (1, 4):
            storage = work / f"memory-{processes}"
            names = register(storage, adapters[:4])
            server = Server(storage, "--api-processes", str(processes))
            try:
                load(server.port, ["smol", *names], 8, 10, 16)
                memory[processes] = {role_pid: round(rss_mb(pid), 1) for pid, role_pid in
                                     ((pid, f"{role} {pid}") for pid, role in server.processes().items())}  # fmt: skip
            finally:
                server.stop()
    onnx = None if "onnx" in args.skip else onnx_row(args.max_tokens, Path.home() / ".cache" / "phitune" / "bench")
    agree = None if "agreement" in args.skip else agreement(adapters, args.max_tokens)
    if "baseline" not in args.skip:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "baseline")], check=False)
    write(args, rows, memory, onnx, agree)
    shutil.rmtree(work, ignore_errors=True)


def write(args, rows: dict, memory: dict, onnx: dict | None, agree: dict | None) -> None:
    out = {"cpu": cpu(), "args": vars(args), "rows": rows, "memory_rss_mb": memory, "onnx_int4": onnx,
           "alone_vs_batched": agree}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_chat.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Chat at load: the inference engine against the lock path",
        "",
        f"`python benchmarks/serve_chat.py --baseline {args.baseline} --seconds {args.seconds:g}` on {cpu()}; "
        f"real SmolLM2-135M-Instruct, streamed, greedy, max_tokens {args.max_tokens}, prompts of 57-62 tokens.",
        "",
        "| server, clients | tokens/s | requests | errors | TTFT p50 | TTFT p90 | ITL p50 | ITL p90 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['tokens_per_s']} | {r['requests']} | {r['errors']} | {r['ttft_p50']} s | "
            f"{r['ttft_p90']} s | {r['itl_p50']} s | {r['itl_p90']} s |"
        )
    one = rows.get("engine, 1 client", {}).get("tokens_per_s")
    many = rows.get("engine, 16 clients", {}).get("tokens_per_s")
    old_one = rows.get("today's lock path, 1 client", {}).get("tokens_per_s")
    old_many = rows.get("today's lock path, 16 clients", {}).get("tokens_per_s")
    lines += ["", "Ratios, same run:"]
    if one and many:
        lines.append(f"- engine, 16 clients / engine, 1 client: **{many / one:.1f}x**")
    if many and old_many:
        lines.append(f"- engine, 16 clients / lock path, 16 clients: **{many / old_many:.1f}x**")
    if one and old_one:
        lines.append(f"- engine, 1 client / lock path, 1 client: **{one / old_one:.2f}x**")
    if onnx:
        lines.append(f"- ONNX Runtime GenAI int4, one stream, same prompts: {onnx['tokens_per_s']} tokens/s")
    rot = rows.get("engine, 64 fine-tunes through a cache of 8, 16 clients")
    if rot:
        lines.append(
            f"- 64 fine-tunes through a cache of 8: {rot['errors']} errors, hit rate {rot['cache_hit_rate']}, "
            f"{rot['cold_loads']} cold loads of {rot['cold_load_mean_s']} s on average, {rot['evictions']} evictions"
        )
    if agree:
        lines.append(
            f"- {agree['dtype']}, each of {agree['replies']} requests (base + 4 fine-tunes) alone vs all in one batch: "
            f"{agree['identical_replies']} identical replies, token agreement {agree['token_agreement']}"
        )
    for processes, table in memory.items():
        lines.append(f"- RSS with --api-processes {processes}: " + ", ".join(f"{k} {v} MB" for k, v in table.items()))
    (RESULTS / "serve_chat.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
