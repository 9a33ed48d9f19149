"""`phitune serve` in a process group of its own, for the service benchmarks."""

from __future__ import annotations

import http.client
import subprocess
import sys
import time
from pathlib import Path


def start_serve(storage: Path, model: str, *extra: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """Start `phitune serve --storage STORAGE --model MODEL EXTRA...` on a free loopback port and
    wait until GET /v1/models answers 200 (a keyless server on loopback); (the process, its port)."""
    from phitune.training.distributed import free_port

    port = free_port()
    command = [sys.executable, "-m", "phitune", "serve", "--storage", str(storage), "--model", model]
    proc = subprocess.Popen(
        [*command, "--port", str(port), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("server did not start")
