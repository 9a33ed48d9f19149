"""The service: `phitune serve`, `phitune worker` and `phitune keys` (its API keys)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from phitune.argtypes import positive_int
from phitune.cli.common import EXIT_USAGE, log
from phitune.errors import PhituneError

if TYPE_CHECKING:
    from phitune.serve.settings import Settings


def serve_settings(args: argparse.Namespace) -> Settings:
    from phitune.serve.settings import Settings, parse_models

    models = parse_models(args.model)
    for name in args.trust_remote_code or []:
        if name not in models:
            raise PhituneError(
                f"--trust-remote-code {name}: not a served model; give the NAME of a --model NAME=PATH "
                f"(served: {', '.join(models) or 'none'})"
            )
    if args.keep_checkpoints < 0:
        raise PhituneError(f"--keep-checkpoints {args.keep_checkpoints}: must be >= 0 (0 keeps every checkpoint)")
    if args.org_quota_mb is not None and args.org_quota_mb <= 0:
        raise PhituneError(f"--org-quota-mb {args.org_quota_mb}: must be > 0 (leave it out for no quota)")
    for flag in ("max_upload_mb", "max_request_mb"):
        if getattr(args, flag) <= 0:
            raise PhituneError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be > 0")
    return Settings(
        storage=Path(args.storage),
        db_url=args.db or "",
        models=models,
        trusted=list(args.trust_remote_code or []),
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_request_bytes=int(args.max_request_mb * 2**20),
        org_quota_bytes=int(args.org_quota_mb * 2**20) if args.org_quota_mb else None,
        keep_checkpoints=args.keep_checkpoints,
        stale_seconds=args.stale_seconds,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """The job worker (unless --no-worker) in this process, the API in --api-processes children."""
    import threading

    from phitune.serve.app import listen, serve_api
    from phitune.serve.db import connect
    from phitune.serve.guard import allowed_hosts
    from phitune.serve.keys import any_key
    from phitune.serve.settings import is_loopback
    from phitune.serve.storage import recover
    from phitune.serve.worker import Worker

    settings = serve_settings(args)
    settings.open_when_keyless = is_loopback(args.host)
    settings.allowed_hosts = allowed_hosts(args.host, args.allow_host)
    if args.read_timeout <= 0:
        raise PhituneError(f"--read-timeout {args.read_timeout}: must be > 0 seconds")
    settings.max_connections, settings.read_timeout = args.max_connections, args.read_timeout
    settings.engine, settings.engine_dtype = engine_limits(args), args.engine_dtype
    _raise_file_limit(args.max_connections * args.api_processes)
    settings.storage.mkdir(parents=True, exist_ok=True)
    _, sessions, _ = connect(settings.db_url)  # the worker's too
    recover(settings, sessions)  # uploads a killed server left half-written
    has_keys = any_key(sessions)
    if not has_keys and not settings.open_when_keyless:
        raise PhituneError(
            f"--host {args.host}: no API key exists, so the server would be open to anyone; create one "
            f"with `phitune keys create --org ORG --storage {args.storage}` or listen on 127.0.0.1"
        )
    if not settings.models:
        log.warning("no --model given: jobs and chat need at least one base model (--model NAME=PATH)")
    if args.api_processes < 1:
        raise PhituneError(f"--api-processes {args.api_processes}: at least 1")
    sock = listen(args.host, args.port)
    print(
        f"phitune serve: http://{args.host}:{args.port}/v1 (docs at /docs); models: "
        f"{', '.join(settings.models) or 'none'}; "
        f"keys: {'required' if has_keys else 'none (loopback only, any key accepted)'}",
        flush=True,
    )
    # One engine process holds each base model once for every API process.
    engine = start_engine(settings)
    # The job worker is a thread of this process, which also supervises the API processes.
    stop, thread = threading.Event(), None
    if not args.no_worker:
        thread = threading.Thread(
            target=Worker(settings, sessions, name="embedded").run, args=(stop,), daemon=True, name="phitune-worker"
        )
        thread.start()
    try:
        serve_api(settings, sock, processes=args.api_processes)
    finally:
        stop.set()  # a running job is stopped and re-queued; it continues from its checkpoint
        if thread:
            thread.join(timeout=30)
        engine.stop()
    return 0


def engine_limits(args: argparse.Namespace) -> dict:
    if args.max_step_tokens < args.max_batch:
        raise PhituneError(
            f"--max-step-tokens {args.max_step_tokens}: at least --max-batch ({args.max_batch}), "
            "so every running sequence gets its token each step"
        )
    return {
        "max_batch": args.max_batch,
        "max_step_tokens": args.max_step_tokens,
        "kv_cache_mb": args.kv_cache_mb,
        "max_adapters": args.max_adapters,
        "max_adapter_mb": args.max_adapter_mb,
    }


def start_engine(settings: Settings):
    from phitune.inference.limits import Limits
    from phitune.inference.process import EngineProcess

    engine = EngineProcess(Limits(**settings.engine), settings.engine_dtype).start()
    settings.engine_socket = engine.socket
    return engine


def _raise_file_limit(connections: int) -> None:
    """Descriptors for every allowed connection plus the server's own files (the soft limit is
    often 1024; the hard one is the most a process may raise it to)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard)
        )


def cmd_worker(args: argparse.Namespace) -> int:
    """A worker on its own: claims jobs from the shared database until interrupted."""
    import threading

    from phitune.serve.db import connect
    from phitune.serve.worker import Worker

    settings = serve_settings(args)
    _, sessions, _ = connect(settings.db_url)
    print(f"phitune worker: {settings.db_url.split('@')[-1]}, storage {settings.storage}", flush=True)
    Worker(settings, sessions, name="worker").run(threading.Event())
    return 0


def existing_service(args: argparse.Namespace) -> Settings:
    """The settings of a service that exists: its --storage directory is there (or --db names a database)."""
    settings = serve_settings(args)
    if not args.db and not settings.storage.is_dir():
        raise PhituneError(
            f"--storage {args.storage}: no such directory, so no service keys; give the --storage "
            "that `phitune serve` uses"
        )
    return settings


def cmd_keys_create(args: argparse.Namespace) -> int:
    from phitune.serve.keys import check_org, create_key

    check_org(args.org)  # before anything is created
    settings = serve_settings(args)
    settings.storage.mkdir(parents=True, exist_ok=True)
    key, ident = create_key(settings.db_url, args.org)
    print(key)
    print(f"(organization {args.org}, key id {ident}; only its hash is stored: keep the key now)", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """Key ids (the first 12 hex digits of the key's SHA-256), organizations, creation times."""
    import time

    from phitune.serve.keys import list_keys

    for ident, org, created_at in list_keys(existing_service(args).db_url, org=args.org):
        print(f"{ident}  {org}  {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(created_at))} UTC")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Delete a key by its id (from `keys list`) or the key itself; servers stop accepting it
    within 5 s."""
    from phitune.serve.keys import revoke_key

    print(f"revoked key {revoke_key(existing_service(args).db_url, args.key)}")
    return 0


def storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", default="serve-data", help="directory for the database, files and job runs")
    parser.add_argument("--db", help="database URL (default: SQLite in --storage), e.g. postgresql://user:pw@host/db")
    parser.add_argument("--model", action="append", metavar="NAME=PATH", help="a base model to serve (repeatable)")
    parser.add_argument(
        "--trust-remote-code",
        action="append",
        metavar="NAME",
        help="let served model NAME run the modelling code in its directory, for training and chat "
        "(repeatable; a job can never ask for it)",
    )
    parser.add_argument("--max-upload-mb", type=float, default=512, help="largest accepted upload (default 512)")
    parser.add_argument(
        "--max-request-mb",
        type=float,
        default=8,
        help="largest body of any other request, refused before it is read (default 8)",
    )
    parser.add_argument(
        "--org-quota-mb",
        type=float,
        help="bytes of files and fine-tuning runs one organization may store (default: no quota)",
    )
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=3,
        help="a job's newest checkpoints kept, plus its best with a validation file (default 3; 0 keeps all)",
    )
    parser.add_argument(
        "--stale-seconds",
        type=float,
        default=30,
        help="re-queue a running job whose worker sent no heartbeat for this long (default 30)",
    )


def engine_options(parser: argparse.ArgumentParser) -> None:
    """The inference engine's bounds (`phitune serve`)."""
    parser.add_argument("--max-batch", type=positive_int, default=32, help="sequences generated together (default 32)")
    parser.add_argument(
        "--max-step-tokens",
        type=positive_int,
        default=256,
        help="tokens one engine step computes: every running reply's next token plus chunks of new "
        "prompts (default 256); smaller keeps replies flowing while long prompts arrive",
    )
    parser.add_argument(
        "--kv-cache-mb",
        type=positive_int,
        default=1024,
        help="memory for keys and values per served base model; requests wait for room (default 1024)",
    )
    parser.add_argument(
        "--max-adapters", type=positive_int, default=8, help="fine-tunes kept in memory per base model (default 8)"
    )
    parser.add_argument(
        "--max-adapter-mb",
        type=positive_int,
        default=512,
        help="bytes of fine-tunes kept in memory per base model (default 512)",
    )
    parser.add_argument(
        "--engine-dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="weights and activations in the engine (auto: bfloat16 on CPUs with AVX-512 BF16 or AMX)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="the OpenAI-compatible fine-tuning service (FastAPI) with a built-in worker")
    storage_options(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument(
        "--allow-host",
        action="append",
        metavar="NAME",
        help="a Host name a keyless server also answers to (repeatable; it always answers to 127.0.0.1, "
        "localhost, ::1 and --host)",
    )
    sv.add_argument(
        "--max-connections",
        type=positive_int,
        default=1000,
        help="open connections per API process; more are answered 503 (default 1000)",
    )
    sv.add_argument(
        "--read-timeout",
        type=float,
        default=30,
        help="seconds a request body may pause before the request is refused with 408 (default 30)",
    )
    sv.add_argument("--no-worker", action="store_true", help="API only; run `phitune worker` processes instead")
    sv.add_argument(
        "--api-processes",
        type=positive_int,
        default=1,
        help="API processes sharing the port (default 1); more serve more clients at once; they share "
        "one inference engine process, which holds each model once",
    )
    engine_options(sv)
    sv.set_defaults(func=cmd_serve)

    wk = sub.add_parser("worker", help="run fine-tuning jobs from the service's database")
    storage_options(wk)
    wk.set_defaults(func=cmd_worker)

    kp = sub.add_parser("keys", help="API keys of the service")
    ksub = kp.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND")
    kc = ksub.add_parser("create", help="create an API key for an organization (printed once)")
    kc.add_argument("--org", required=True)
    storage_options(kc)
    kc.set_defaults(func=cmd_keys_create)
    kl = ksub.add_parser("list", help="key ids, organizations and creation times (never the keys)")
    kl.add_argument("--org")
    storage_options(kl)
    kl.set_defaults(func=cmd_keys_list)
    kr = ksub.add_parser("revoke", help="delete a key by its id from `keys list` (or the key itself)")
    kr.add_argument("key", help="key id (12 hex digits) or the key")
    storage_options(kr)
    kr.set_defaults(func=cmd_keys_revoke)
    kp.set_defaults(func=lambda a: (kp.print_help(), EXIT_USAGE)[1])
