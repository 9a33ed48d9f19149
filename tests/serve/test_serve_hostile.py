"""`phitune serve` on loopback against hostile clients, over raw sockets where the SDK would be
polite: abandoned streams (RST, FIN, a reader that stops), bodies that are huge, endless, slow or
keyless, another web origin, a rebound Host name, slow headers, a supervisor killed with -9. Each
attack is followed by another tenant's request that must be answered at once, and the API
process's peak memory is read from /proc."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import STARTED, Server, create_key, processes, until, wait_for_job

pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow

FORM = "application/x-www-form-urlencoded"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def keyed(tiny_phi3, tmp_path_factory):
    """A server with two organizations' keys: (server, {org: key})."""
    store = tmp_path_factory.mktemp("hostile")
    server = Server(store, tiny_phi3, "--read-timeout", "3")
    keys = {org: create_key(store, org, server.db) for org in ("alpha", "beta")}
    server.start()
    yield server, keys
    server.stop()


@pytest.fixture(scope="module")
def keyless(tiny_phi3, tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("keyless"), tiny_phi3, "--allow-host", "box.lan").start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _stop_started():
    before = len(STARTED)
    yield
    for s in STARTED[before:]:
        s.stop()
    del STARTED[before:]


# --- raw HTTP -------------------------------------------------------------------------------------


def connect(server, timeout: float = 30) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def head(method: str, path: str, server, headers: dict | None = None) -> bytes:
    headers = {"Host": f"127.0.0.1:{server.port}", **(headers or {})}
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    status = int(top.split(b" ", 2)[1])
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.decode().partition(":") for line in top.split(b"\r\n")[1:])
    }
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def request(server, method: str, path: str, body: bytes = b"", headers: dict | None = None, timeout: float = 30):
    """One request on its own connection: (status, headers, parsed JSON or raw body)."""
    with connect(server, timeout) as sock:
        sock.sendall(head(method, path, server, {"Content-Length": len(body), **(headers or {})}) + body)
        status, headers, raw = response(sock)
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw


def chat(server, key: str | None, *, timeout: float = 30, **extra) -> tuple[int, dict]:
    body = json.dumps({**CHAT, "max_tokens": 4, **extra}).encode()
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    status, _, answer = request(
        server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json", **auth}, timeout
    )
    return status, answer


def engine_process(server) -> int:
    """The inference engine process the supervisor started."""
    engines = processes(lambda cmd: "phitune.inference.server" in cmd)
    (pid,) = [pid for pid, _ in engines if _parent(pid) == server.proc.pid]
    return pid


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def api_processes(server) -> list[int]:
    """The API processes uvicorn's supervisor spawned (not its resource tracker or a training run)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            spawned = b"spawn_main" in (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == server.proc.pid and spawned and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def peak_rss_mb(server) -> float:
    """The largest peak resident memory (VmHWM) among the server's API processes."""
    peaks = []
    for pid in api_processes(server):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)


# --- 1: an abandoned stream ------------------------------------------------------------------------


def _start_stream(server, key: str, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", server.port))
    body = json.dumps({**CHAT, "max_tokens": 4096, "stream": True}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "Content-Length": len(body)}
    sock.sendall(head("POST", "/v1/chat/completions", server, headers) + body)
    seen = b""
    while seen.count(b"data: ") < 3:  # the role chunk and two pieces of the reply
        seen += sock.recv(4096)
    return sock


@pytest.mark.parametrize("style", ["rst", "fin", "stops-reading"])
def test_an_abandoned_stream_never_blocks_another_tenant(keyed, style):
    server, keys = keyed
    for trial in range(3):
        sock = _start_stream(server, keys["alpha"], rcvbuf=4096)
        if style == "rst":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        elif style == "fin":
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        started = time.monotonic()
        status, answer = chat(server, keys["beta"], timeout=60)
        waited = time.monotonic() - started
        assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant", answer
        # The engine batches: another tenant's request runs beside an abandoned one (RST and FIN
        # free its slot at the next step; a reader that stops holds one slot of --max-batch).
        assert waited < 5, f"{style} trial {trial}: {waited:.1f} s"
        sock.close()
    assert "cannot join current thread" not in _log(server)


def test_a_killed_engine_ends_its_streams_with_an_error_and_comes_back(keyed):
    server, keys = keyed
    sock = _start_stream(server, keys["alpha"])
    os.kill(engine_process(server), signal.SIGKILL)
    sock.settimeout(10)
    rest = b""
    while not rest.endswith(b"0\r\n\r\n"):  # the chunked stream's end: no hang
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    sock.close()
    assert b'"error"' in rest and b"inference engine stopped" in rest, rest[-300:]
    # The supervisor starts it again; the next request loads the model again and is answered.
    status, answer = chat(server, keys["beta"], timeout=90)
    assert status == 200, answer


def test_api_processes_share_one_engine_and_never_load_the_model(tiny_phi3, tmp_path):
    server = Server(tmp_path / "store", tiny_phi3, "--api-processes", "2").start()
    for _ in range(6):  # over both API processes
        status, answer = chat(server, None, timeout=90)
        assert status == 200, answer
    maps = {pid: Path(f"/proc/{pid}/maps").read_text() for pid in api_processes(server)}
    assert len(maps) == 2 and not any("libtorch" in m for m in maps.values())
    assert "libtorch" in Path(f"/proc/{engine_process(server)}/maps").read_text()


def test_sigterm_stops_a_server_with_a_stalled_stream(tiny_phi3, tmp_path):
    server = Server(tmp_path / "store", tiny_phi3).start()
    sock = _start_stream(server, "local", rcvbuf=4096)  # open, never read again
    started = time.monotonic()
    os.killpg(server.proc.pid, signal.SIGTERM)
    server.proc.wait(timeout=30)
    assert time.monotonic() - started < 20
    sock.close()


def _log(server) -> str:
    """What the server printed so far (its stdout is a pipe; read what is there without blocking)."""
    os.set_blocking(server.proc.stdout.fileno(), False)
    try:
        return server.proc.stdout.read() or ""
    except (TypeError, OSError):
        return ""


# --- 2: bodies -------------------------------------------------------------------------------------


def test_a_keyless_or_oversized_body_is_refused_before_it_is_read(keyed):
    server, keys = keyed
    before = peak_rss_mb(server)
    # 300 MB announced without a key: the 401 comes back while the body is still unsent.
    for auth in ({}, {"Authorization": "Bearer sk-wrong"}):
        with connect(server) as sock:
            sock.sendall(head("POST", "/v1/chat/completions", server, {"Content-Length": 300 * 2**20, **auth}))
            sock.sendall(b"{" + b" " * 2**20)
            status, headers, body = response(sock)
            assert status == 401 and headers.get("connection") == "close", body
    # With a key, 300 MB announced: 413 at once, nothing read.
    with connect(server) as sock:
        sock.sendall(head("POST", "/v1/chat/completions", server, {"Content-Length": 300 * 2**20, **_auth(keys)}))
        status, _, body = response(sock)
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    # Chunked, with a key, never ending: cut off past the limit (8 MiB), not read to the end.
    with connect(server) as sock:
        sock.sendall(head("POST", "/v1/chat/completions", server, {"Transfer-Encoding": "chunked", **_auth(keys)}))
        sent = 0
        chunk = b"%x\r\n%s\r\n" % (2**20, b" " * 2**20)
        try:
            while sent < 300:
                sock.sendall(chunk)
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = response(sock)
        assert status == 413 and sent < 300, (status, sent)
    # A multipart flood of small fields (chunked): refused after a few parts.
    boundary = "b0undary"
    part = f"--{boundary}\r\nContent-Disposition: form-data; name=f\r\n\r\nx\r\n".encode()
    with connect(server) as sock:
        sock.sendall(
            head(
                "POST",
                "/v1/files",
                server,
                {
                    "Transfer-Encoding": "chunked",
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                    **_auth(keys),
                },
            )
        )
        flood = part * 20000
        try:
            for _ in range(100):
                sock.sendall(b"%x\r\n%s\r\n" % (len(flood), flood))
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = response(sock)
        assert status == 400 and "parts" in json.loads(body)["error"]["message"], body
    grew = peak_rss_mb(server) - before
    assert grew < 60, f"the API process's peak memory grew by {grew:.0f} MB"
    assert chat(server, keys["beta"])[0] == 200
    assert not list((server.storage / "files").glob("*")), "nothing of a refused upload stays"


def _auth(keys) -> dict:
    return {"Authorization": f"Bearer {keys['alpha']}"}


# --- 3: Host and Origin ------------------------------------------------------------------------------


def test_a_keyless_server_answers_only_its_own_names(keyless):
    for host, expected in [
        ("rebind.attacker.example", 403),
        (f"rebind.attacker.example:{keyless.port}", 403),
        (f"127.0.0.1:{keyless.port}", 200),
        (f"localhost:{keyless.port}", 200),
        (f"[::1]:{keyless.port}", 200),
        ("box.lan", 200),  # --allow-host
    ]:
        status, _, body = request(keyless, "GET", "/v1/files", headers={"Host": host})
        assert status == expected, (host, body)
    status, _, body = request(keyless, "GET", "/v1/files", headers={"Host": "evil.example"})
    assert body["error"]["code"] == "host_not_allowed" and "--allow-host" in body["error"]["message"]


def test_a_keyed_server_answers_any_host_with_a_key(keyed):
    server, keys = keyed
    status, _, _ = request(server, "GET", "/v1/files", headers={"Host": "api.example.org", **_auth(keys)})
    assert status == 200


@pytest.mark.parametrize(
    "browser",
    [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}],
    ids=["origin", "sec-fetch-site", "null-origin"],
)
def test_cross_site_writes_are_refused(keyless, keyed, browser):
    form = b"model=tiny&training_file=file-x"
    for path, kind in [("/portal/jobs", FORM), ("/v1/files", "multipart/form-data")]:
        status, _, body = request(keyless, "POST", path, form, {"Content-Type": kind, **browser})
        assert status == 403 and body["error"]["code"] == "cross_origin_refused", (path, body)
    server, keys = keyed
    status, _, body = request(server, "POST", "/portal/jobs", form, {**browser, **_auth(keys)})
    assert status == 403, body
    # The portal's own pages post with their own origin: allowed through to the form's checks,
    # also through a proxy that ends TLS (https origin, http to the server).
    for own in (f"http://127.0.0.1:{keyless.port}", f"https://127.0.0.1:{keyless.port}"):
        headers = {"Content-Type": FORM, "Origin": own, "Sec-Fetch-Site": "same-origin"}
        status, _, _ = request(keyless, "POST", "/portal/jobs", form, headers)
        assert status == 200, own
    # Another web server on this machine is another origin.
    status, _, _ = request(
        keyless, "POST", "/portal/jobs", form, {"Content-Type": FORM, "Origin": "http://localhost:3000"}
    )
    assert status == 403


# --- 6: slow clients ---------------------------------------------------------------------------------


def test_slow_headers_and_bodies_are_cut_off(keyed):
    server, keys = keyed
    slow = []
    for _ in range(200):  # partial headers, never finished
        sock = connect(server)
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    assert chat(server, keys["beta"])[0] == 200  # served while they wait
    for sock in slow:  # the server closes each within its header deadline (10 s)
        sock.settimeout(20)
        assert sock.recv(100) == b""
        sock.close()
    with connect(server) as sock:  # a body that stops arriving: 408 after --read-timeout (3 s)
        sock.sendall(head("POST", "/v1/chat/completions", server, {"Content-Length": 1000, **_auth(keys)}) + b"{")
        started = time.monotonic()
        status, _, body = response(sock)
        assert status == 408 and time.monotonic() - started < 10, body


# --- 12: values that used to be 500s --------------------------------------------------------------------


def test_out_of_range_values_are_400s(keyed):
    server, keys = keyed
    for seed in (2**64, 2**63, -(2**63) - 1):
        status, answer = chat(server, keys["alpha"], seed=seed, temperature=0.7)
        assert status == 400 and answer["error"]["param"] == "seed", answer
    status, answer = chat(server, keys["alpha"], seed=2**63 - 1, temperature=0.7)
    assert status == 200, answer


def test_a_huge_prompt_is_refused_without_tokenizing_it(keyed):
    server, keys = keyed
    text = "word " * (1_500_000)  # 7.5 MB, under the body limit
    started = time.monotonic()
    status, answer = chat(server, keys["alpha"], messages=[{"role": "user", "content": text}])
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    assert time.monotonic() - started < 2.5


# --- 9: the supervisor killed with -9 ----------------------------------------------------------------


def test_api_processes_end_with_their_supervisor(tiny_phi3, tmp_path):
    server = Server(tmp_path / "store", tiny_phi3, "--api-processes", "2").start()
    children = api_processes(server)
    assert len(children) >= 2
    os.kill(server.proc.pid, signal.SIGKILL)  # the supervisor alone, not its process group
    server.proc.wait()
    until(lambda: not any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in children), timeout=15)
    again = subprocess.Popen(
        [sys.executable, "-m", "phitune", "serve", "--storage", str(tmp_path / "store"), "--port", str(server.port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        until(lambda: _answers(server.port), timeout=60)
    finally:
        os.killpg(again.pid, signal.SIGTERM)
        again.wait(timeout=30)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            return sock.recv(12).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


# --- kill -9 anywhere ---------------------------------------------------------------------------------


def _processes_on(store: Path) -> list[int]:
    return [pid for pid, _ in processes(lambda cmd: str(store) in cmd and "phitune" in cmd)]


def _training(store: Path) -> list[int]:
    return [pid for pid, _ in processes(lambda cmd: str(store) in cmd and "-m phitune train" in cmd)]


def test_kill_9_anywhere_loses_nothing_and_leaves_nothing(tiny_phi3, tmp_path):
    from helpers import DEMO_TRAIN

    store = tmp_path / "store"
    server = Server(store, tiny_phi3, "--read-timeout", "1").start()
    c = server.client()
    f = c.files.create(file=DEMO_TRAIN.open("rb"), purpose="fine-tune")
    long_job = {
        "model": "tiny",
        "training_file": f.id,
        "extra_body": {"phitune": {"training": {"learning_rate": 3e-3}}},
    }
    hyper = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 8, "batch_size": 8}}}
    job = c.fine_tuning.jobs.create(**long_job, method=hyper)
    until(lambda: len(c.fine_tuning.jobs.checkpoints.list(job.id).data) >= 1, timeout=240)

    # An API process: the supervisor starts another, and the API keeps answering.
    victim = api_processes(server)[0]
    os.kill(victim, signal.SIGKILL)
    until(lambda: victim not in api_processes(server) and len(api_processes(server)) >= 1 and _answers(server.port))

    # The supervisor (and its embedded worker) alone, mid-job and mid-upload.
    sock = connect(server)
    boundary = "b0undary"
    head_part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    ).encode()
    sock.sendall(
        head(
            "POST",
            "/v1/files",
            server,
            {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": 4 * 2**20},
        )
        + head_part
        + b"x" * 2**20
    )
    until(lambda: list((store / "files").glob("*.partial")), timeout=30)
    children = api_processes(server) + _training(store) + [engine_process(server)]
    assert len(children) >= 3
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    # Its API processes and its training run end with it.
    until(lambda: not _processes_on(store) and not any(_alive(pid) for pid in children), timeout=30)
    sock.close()
    time.sleep(2.5)  # twice --read-timeout: no upload can still be writing the partial file

    server.start()  # same storage and flags, a new process
    c = server.client()
    assert c.files.retrieve(f.id).id == f.id
    assert not list((store / "files").glob("*.partial")), "the cut-off upload is removed at start"
    done = wait_for_job(c, job.id)
    assert done.status == "succeeded", done.error

    # The training process of another job: the job ends failed with a reason, never stuck.
    other = c.fine_tuning.jobs.create(**long_job, method=hyper)
    until(lambda: c.fine_tuning.jobs.retrieve(other.id).status == "running" and _training(store), timeout=240)
    for pid in _training(store):
        os.kill(pid, signal.SIGKILL)
    ended = wait_for_job(c, other.id)
    assert ended.status == "failed" and ended.error.message, ended

    listed = {x.id for x in c.files.list().data}
    children = api_processes(server)
    server.stop()
    assert not _processes_on(store) and not any(_alive(p) for p in children), "no process outlives the service"
    stored = {p.name.split(".", 1)[0] for p in (store / "files").iterdir()}
    assert stored == listed and f.id in listed, "every stored file has its record and every record its file"
