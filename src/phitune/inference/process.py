"""The engine process's life: started by the server (or, for an app without one, by its first
chat request), restarted when it dies, ended with its parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from phitune.errors import PhituneError
from phitune.inference.limits import Limits


class EngineProcess:
    """`python -m phitune.inference.server` on a socket in a fresh 0700 directory. A watcher thread
    starts it again when it exits unasked (its in-flight requests end with an error in the API
    processes; new ones wait for the new process)."""

    def __init__(self, limits: Limits, dtype: str = "auto") -> None:
        self.limits, self.dtype = limits, dtype
        # mode 0700: only this user may connect
        self.directory = Path(tempfile.mkdtemp(prefix="phitune-engine-", dir=_short_temp()))
        self.socket = str(self.directory / "engine.sock")
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping, self._ready = threading.Event(), threading.Event()
        self._failed = ""
        self._lock = threading.Lock()

    def start(self, timeout: float = 300) -> EngineProcess:
        """Start it and wait until it listens. Spawned from a thread that lives as long as this
        object: Linux's parent-death signal follows the spawning thread, not the process."""
        threading.Thread(target=self._run, daemon=True, name="phitune-engine").start()
        if not self._ready.wait(timeout) or self._failed:
            raise PhituneError(f"the inference engine did not start: {self._failed or 'no answer'}")
        return self

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._spawn()
            except PhituneError as exc:
                if not self._ready.is_set():  # the first start: the server cannot serve chat
                    self._failed = str(exc)
                    self._ready.set()
                    return
                print(f"phitune: the inference engine did not start again: {exc}", file=sys.stderr, flush=True)
                self.restarts += 1
                time.sleep(min(5.0, 0.5 * self.restarts))
                continue
            self._ready.set()
            code = self.proc.wait() if self.proc is not None else None
            if self._stopping.is_set():
                return
            print(f"phitune: the inference engine exited ({code}); starting it again", file=sys.stderr, flush=True)
            self.restarts += 1
            time.sleep(min(5.0, 0.5 * self.restarts))

    def _spawn(self) -> None:
        with self._lock:
            Path(self.socket).unlink(missing_ok=True)
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "phitune.inference.server",
                    "--socket",
                    self.socket,
                    "--limits",
                    json.dumps(asdict(self.limits)),
                    "--dtype",
                    self.dtype,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=True,
            )
        if self.proc.stdout is None or self.proc.stdout.readline().strip() != "ready":
            raise PhituneError(f"exit code {self.proc.wait()}; see its log above")

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            if self.proc and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
        Path(self.socket).unlink(missing_ok=True)
        try:
            self.directory.rmdir()
        except OSError:
            pass


def _short_temp() -> str:
    """$TMPDIR, or /tmp when $TMPDIR is too long: a Unix socket's path must fit in 107 bytes."""
    temp = tempfile.gettempdir()
    return temp if len(temp) <= 64 or not os.access("/tmp", os.W_OK) else "/tmp"


def die_with_parent() -> None:
    """This process ends when the one that started it dies, however it dies (kill -9 included):
    an orphan would keep its port or socket and its memory. Linux's parent-death signal where there
    is one; a watch of the parent's pid everywhere."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    if parent == 1:  # the parent died before this process asked for the signal
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True, name="phitune-parent-watch").start()
