"""The service under the attacks of issue 29, measured: for each, the time until the server
answered and how much the API process's peak memory (VmHWM) grew; the worker's process (the
supervisor, where a job's template is applied) for the template attack. A fresh server per attack
(peaks only grow), a tiny model (these attacks never need a real one: they are refused, or cost
what they cost, before any generation).

    python benchmarks/service_attacks.py --label after
    PYTHONPATH=/path/to/old/src python benchmarks/service_attacks.py --label before   # an older checkout

Writes benchmarks/results/service_attacks-LABEL.json and prints a table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _machine import cpu

RESULTS = Path(__file__).resolve().parent / "results"
MB = 2**20


class Server:
    def __init__(self, root: Path, model: Path) -> None:
        self.store = root / f"store-{time.monotonic_ns()}"
        self.keys = {org: _keys(self.store, org) for org in ("alpha", "beta")}
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "phitune", "serve", "--storage", str(self.store), "--model", f"tiny={model}"]
            + ["--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 60
        while time.time() < deadline and not _answers(self.port):
            time.sleep(0.3)

    def api_pid(self) -> int:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.proc.pid and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                    return int(stat.parent.name)
            except OSError:
                continue
        raise RuntimeError("no API process")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def _keys(store: Path, org: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "phitune", "keys", "create", "--org", org, "--storage", str(store)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET /docs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            return sock.recv(12).startswith(b"HTTP/1.1")
    except OSError:
        return False


def hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def status_of(sock: socket.socket) -> int | None:
    sock.settimeout(120)
    try:
        data = sock.recv(64)
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else None
    except (OSError, IndexError, ValueError):
        return None


def send_body(port: int, headers: str, chunks, *, chunked: bool) -> int | None:
    """Send the headers, then the body as long as the server reads it; the status it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(headers.encode())
        try:
            for chunk in chunks:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        return status_of(sock)


def head(method: str, path: str, port: int, **headers: object) -> str:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines) + "\r\n\r\n"


# --- the attacks --------------------------------------------------------------------------------


def big_json(server: Server, copies: int = 1) -> dict:
    size = 300 * MB

    def one(out: list) -> None:
        body = (b"x" * MB for _ in range(size // MB))
        out.append(
            send_body(
                server.port, head("POST", "/v1/chat/completions", server.port, Content_Length=size), body, chunked=False
            )
        )

    statuses: list = []
    threads = [threading.Thread(target=one, args=(statuses,)) for _ in range(copies)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return {"status": statuses}


def field_flood(server: Server) -> dict:
    boundary = "b0undary"

    def block(n: int) -> bytes:  # 20,000 fields of distinct names, ~1.3 MB
        return b"".join(
            f"--{boundary}\r\nContent-Disposition: form-data; name=f{n}_{i}\r\n\r\nx\r\n".encode() for i in range(20000)
        )

    blocks = (block(n) for n in range(540))  # ~700 MB, 10.8 million fields
    headers = head(
        "POST",
        "/v1/files",
        server.port,
        Authorization=f"Bearer {server.keys['alpha']}",
        Content_Type=f"multipart/form-data; boundary={boundary}",
        Transfer_Encoding="chunked",
    )
    return {"status": send_body(server.port, headers, blocks, chunked=True)}


def _upload(server: Server, data: bytes) -> str:
    import urllib.request

    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/v1/files",
        data=body,
        headers={
            "Authorization": f"Bearer {server.keys['alpha']}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
    )
    return json.loads(urllib.request.urlopen(req, timeout=300).read())["id"]


def _post_json(server: Server, path: str, body: dict, org: str = "alpha") -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{server.port}{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {server.keys[org]}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def template_width(server: Server) -> dict:
    rows = "".join(json.dumps({"a": f"q{i}", "out": f"a{i}"}) + "\n" for i in range(20))[:520]
    file_id = _upload(server, rows.rsplit("\n", 1)[0].encode() + b"\n")
    data = {"format": "template", "template": "Q: {a:>25000000} A: {out}", "completion_field": "out"}
    code, job = _post_json(
        server, "/v1/fine_tuning/jobs", {"model": "tiny", "training_file": file_id, "phitune": {"data": data}}
    )
    if code == 200:  # accepted: the worker (in the supervisor) validates it
        time.sleep(15)
    return {"status": code}


def file_checks(server: Server) -> dict:
    import urllib.request

    row = json.dumps({"messages": [{"role": "user", "content": "q" * 40}, {"role": "assistant", "content": "a" * 40}]})
    big = _upload(server, ((row + "\n") * (100 * MB // (len(row) + 1))).encode())

    def one(file_id: str, out: list) -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/v1/files/{file_id}/check?model=tiny",
            headers={"Authorization": f"Bearer {server.keys['alpha']}"},
        )
        try:
            out.append(urllib.request.urlopen(req, timeout=300).status)
        except Exception as exc:  # noqa: BLE001 - a 503 is an answer too
            out.append(getattr(exc, "code", str(exc)))

    one(_upload(server, (row + "\n").encode()), [])  # the tokenizer loaded first: that is not the attack
    statuses: list = []
    base, started = hwm_mb(server.api_pid()), time.monotonic()
    threads = [threading.Thread(target=one, args=(big, statuses)) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return {"status": statuses, "baseline_mb": base, "seconds": round(time.monotonic() - started, 2)}


def huge_prompt(server: Server) -> dict:
    hello = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    _post_json(server, "/v1/chat/completions", hello)  # the model loaded first: that is not the attack
    base, started = hwm_mb(server.api_pid()), time.monotonic()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "word " * 1_000_000}]}
    code, _ = _post_json(server, "/v1/chat/completions", body)
    return {"status": code, "baseline_mb": base, "seconds": round(time.monotonic() - started, 2)}


def abandoned_stream(server: Server) -> dict:
    body = json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4096, "stream": True}
    )
    waits = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        sock.sendall(
            head(
                "POST",
                "/v1/chat/completions",
                server.port,
                Authorization=f"Bearer {server.keys['alpha']}",
                Content_Type="application/json",
                Content_Length=len(body),
            ).encode()
            + body.encode()
        )
        seen = b""
        while seen.count(b"data: ") < 3:
            seen += sock.recv(4096)
        import struct

        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
        started = time.monotonic()
        code, _ = _post_json(
            server,
            "/v1/chat/completions",
            {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
            org="beta",
        )
        waits.append(round(time.monotonic() - started, 2))
    return {"other_tenant_wait_s": waits, "status": code}


ATTACKS = {
    "keyless 300 MB JSON body": (big_json, "api"),
    "four keyless 300 MB bodies at once": (lambda s: big_json(s, 4), "api"),
    "multipart flood of small fields (700 MB, chunked)": (field_flood, "api"),
    "template {a:>25000000} on a 520-byte file": (template_width, "supervisor"),
    "four checks of a 100 MB file at once": (file_checks, "api"),
    "5 MB prompt": (huge_prompt, "api"),
    "streamed chat abandoned (RST), then another tenant's chat, x3": (abandoned_stream, "api"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--only", nargs="*", help="attack names to run (default: all)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="attacks-"))
    model = root / "tiny"
    subprocess.run(
        [sys.executable, "-m", "phitune", "create-model", str(model), "--arch", "phi3", "--preset", "tiny"],
        check=True,
        capture_output=True,
    )
    import phitune

    rows = []
    for name, (attack, where) in ATTACKS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        server = Server(root, model)
        try:
            pid = server.api_pid() if where == "api" else server.proc.pid
            before = hwm_mb(pid)
            started = time.monotonic()
            result = attack(server)
            elapsed = time.monotonic() - started
            before = result.pop("baseline_mb", before)
            elapsed = result.pop("seconds", elapsed)
            grew = hwm_mb(pid) if Path(f"/proc/{pid}").exists() else float("nan")
            rows.append(
                {
                    "attack": name,
                    "process": where,
                    "seconds": round(elapsed, 2),
                    "peak_growth_mb": round(grew - before, 1),
                    **result,
                }
            )
            print(f"{name:60s} {elapsed:7.2f} s  +{grew - before:7.1f} MB  {result}", flush=True)
        finally:
            server.stop()
    out = {
        "label": args.label,
        "phitune": str(Path(phitune.__file__).parent),
        "machine": {"cpu": cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
        "attacks": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"service_attacks-{args.label}.json"
    if args.only and path.is_file():  # a partial run replaces its own rows, keeps the others
        ran = {row["attack"] for row in rows}
        kept = [row for row in json.loads(path.read_text())["attacks"] if row["attack"] not in ran]
        out["attacks"] = sorted(kept + rows, key=lambda row: list(ATTACKS).index(row["attack"]))
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
