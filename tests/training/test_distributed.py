"""Several processes on CPU (gloo): DDP, ZeRO-2, ZeRO-3 and FSDP2 give the single-process run's
losses and artifacts; sharded adapters are whole; killed runs resume exactly; two "machines"
(two torchrun invocations over loopback) train together."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import TOY_EXAMPLE_FLAGS, losses, run_cli

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

TOL = 1e-5  # gloo sums gradients in another order than one process does: ~1e-6 seen over 12 steps
STRATEGIES = {
    "ddp": ["--set", "distributed.strategy=ddp"],
    "zero2": ["--set", "distributed.strategy=deepspeed", "--set", "distributed.zero_stage=2"],
    "zero3": ["--set", "distributed.strategy=deepspeed", "--set", "distributed.zero_stage=3"],
    "fsdp": ["--set", "distributed.strategy=fsdp"],
}


def _config(path, model, data, val, out, **training):
    cfg = {
        "model": str(model),
        "method": {"name": "lora", "dropout": 0.0, "target_modules": ["all-linear", "lm_head"]},
        "data": {"train": str(data), "validation": str(val), "max_length": 256},
        # Accumulation, evaluation and checkpoints all take part; 64 examples / 8 = 8 steps an epoch.
        "training": {
            "max_steps": 12,
            "batch_size": 8,
            "gradient_accumulation_steps": 2,
            "learning_rate": 3e-3,
            "log_every": 1,
            "eval_every": 4,
            "save_every": 4,
            "precision": "fp32",
            "seed": 3,
            **training,
        },
        "output_dir": str(out),
    }
    path.write_text(json.dumps(cfg))
    return path


def _phitune(*args, **popen):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "phitune", *map(str, args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _run(*args) -> None:
    proc = _phitune(*args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def _eval_losses(out):
    return [
        json.loads(line)["eval_loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "eval_loss" in line
    ]


def _close(a, b, tol=TOL):
    assert len(a) == len(b) and a, (a, b)
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst < tol, f"max difference {worst}: {a} vs {b}"


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_phi3, chat_files):
    root = tmp_path_factory.mktemp("single")
    cfg = _config(root / "c.json", tiny_phi3, *chat_files, root / "out")
    assert run_cli("train", cfg) == 0
    return cfg, root / "out"


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_two_processes_give_the_single_process_losses(strategy, single, tmp_path):
    cfg, reference = single
    out = tmp_path / strategy
    _run("train", cfg, "--nproc", "2", "--set", f"output_dir={out}", *STRATEGIES[strategy])
    _close(losses(out), losses(reference))
    _close(_eval_losses(out), _eval_losses(reference))
    run = json.loads((out / "run.json").read_text())
    assert run["processes"] == 2 and run["strategy"] == {"ddp": "ddp", "fsdp": "fsdp"}.get(strategy, "deepspeed")
    if strategy in ("zero3", "fsdp"):  # sharded parameters
        _check_sharded_adapter(out, reference)


def _check_sharded_adapter(out, reference):
    """The ZeRO-3 / FSDP adapter is whole (TRL #4416 / PEFT #2892 saved empty ones) and loads in plain PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours, theirs = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, reference))
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape and tensor.numel() > 0, name
        torch.testing.assert_close(tensor, theirs[name], atol=1e-4, rtol=1e-4)
    # The checkpoint's adapter too (saved mid-run, also gathered).
    mid = load_file(out / "checkpoints" / "step-000012" / "adapter" / "adapter_model.safetensors")
    assert all(mid[k].numel() == ours[k].numel() for k in ours)
    base_dir = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        plain = base(input_ids=ids).logits
        a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter")(
            input_ids=ids
        ).logits
        b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), reference / "adapter")(
            input_ids=ids
        ).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - plain).abs().max() > 1e-2  # the adapter is trained, not zeros


@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp"])
def test_killed_mid_run_resumes_exactly(strategy, single, tmp_path):
    cfg, reference = single
    out = tmp_path / "killed"
    args = ["train", cfg, "--nproc", "2", "--set", f"output_dir={out}", *STRATEGIES[strategy]]
    # A session of its own, so the launcher and both workers die together.
    proc = _phitune(*args, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-000004").is_dir():
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "step-000012").exists()  # killed with steps left to run
    _run(*args, "--resume")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    _close(losses(out), losses(reference))


def test_two_machines_over_loopback(single, tmp_path):
    """Two torchrun invocations, node ranks 0 and 1, one process each, rendezvous on 127.0.0.1."""
    from phitune.training.distributed import free_port

    cfg, reference = single
    out = tmp_path / "nodes"
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                "-m",
                "phitune",
                "train",
                str(cfg),
                "--set",
                f"output_dir={out}",
                *STRATEGIES["zero3"],
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        for rank in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    _close(losses(out), losses(reference))


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_full_fine_tuning_with_sharded_parameters_saves_the_whole_model(strategy, tmp_path, tiny_phi3, chat_files):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    outs = {}
    for name, extra in (("single", []), (strategy, ["--nproc", "2", *STRATEGIES[strategy]])):
        cfg = _config(
            tmp_path / f"{name}.json",
            tiny_phi3,
            *chat_files,
            tmp_path / name,
            max_steps=4,
            save_every=None,
            eval_every=None,
            learning_rate=1e-3,
        )
        raw = json.loads(cfg.read_text())
        raw["method"] = {"name": "full"}
        cfg.write_text(json.dumps(raw))
        _run("train", cfg, *extra)
        outs[name] = tmp_path / name
    _close(losses(outs[strategy]), losses(outs["single"]))
    # The sharded run streams its weights into the file itself: the same tensors under the same names.
    files = {n: sorted(p.name for p in (outs[n] / "model").iterdir()) for n in (strategy, "single")}
    assert files[strategy] == files["single"]
    with safe_open(str(outs[strategy] / "model" / "model.safetensors"), "pt") as f:
        with safe_open(str(outs["single"] / "model" / "model.safetensors"), "pt") as g:
            assert sorted(f.keys()) == sorted(g.keys())
    a, b = (AutoModelForCausalLM.from_pretrained(outs[n] / "model").state_dict() for n in (strategy, "single"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)


def test_dpo_under_zero3_learns_the_preferences(tiny_phi3, tmp_path, monkeypatch):
    from helpers import REPO

    monkeypatch.chdir(REPO)
    out = tmp_path / "dpo"
    _run(
        "train",
        REPO / "examples" / "dpo" / "config.yaml",
        "--nproc",
        "2",
        "--set",
        f"model.name_or_path={tiny_phi3}",
        "--set",
        f"output_dir={out}",
        "--set",
        "training.log_every=1",
        *TOY_EXAMPLE_FLAGS,
        "--set",
        "training.batch_size=16",
        "--set",
        "method.target_modules=[all-linear,lm_head]",
        "--max-steps",
        "20",
        *STRATEGIES["zero3"],
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert abs(records[0]["reward_margin"]) < 1e-4
    assert (
        records[-1]["reward_margin"] > 1.0
        and json.loads((out / "run.json").read_text())["eval"]["reward_accuracy"] > 0.8
    )


def test_offload_runs_and_matches(single, tmp_path):
    cfg, reference = single
    out = tmp_path / "offload"
    _run(
        "train",
        cfg,
        "--nproc",
        "2",
        "--set",
        f"output_dir={out}",
        *STRATEGIES["zero3"],
        "--set",
        "distributed.offload_params=cpu",
        "--set",
        "distributed.offload_optimizer=cpu",
    )
    _close(losses(out), losses(reference))


def test_qlora_under_zero2_matches_one_process(tmp_path, tiny_phi3, chat_files):
    pytest.importorskip("bitsandbytes")
    outs = {}
    for name, extra in (("single", []), ("zero2", ["--nproc", "2", *STRATEGIES["zero2"]])):
        cfg = _config(tmp_path / f"{name}.json", tiny_phi3, *chat_files, tmp_path / name, max_steps=6, save_every=None)
        _run("train", cfg, "--set", "method.name=qlora", *extra)
        outs[name] = losses(tmp_path / name)
    _close(outs["zero2"], outs["single"])


def test_task_metric_on_generated_answers_is_the_same_with_sharded_weights(tiny_phi3, tmp_path, monkeypatch):
    """Under ZeRO-3 and FSDP every process answers its share of the validation set, generating in
    step with the others (the weights are gathered layer by layer): the metric equals one process's."""
    from helpers import REPO

    monkeypatch.chdir(REPO)
    scores = {}
    for name, extra in (
        ("single", []),
        ("zero3", ["--nproc", "2", *STRATEGIES["zero3"]]),
        ("fsdp", ["--nproc", "2", *STRATEGIES["fsdp"]]),
    ):
        out = tmp_path / name
        _run(
            "train",
            REPO / "examples" / "translation" / "config.yaml",
            "--set",
            f"model.name_or_path={tiny_phi3}",
            "--set",
            f"output_dir={out}",
            "--set",
            "training.precision=fp32",
            "--set",
            "training.eval_every=10",
            "--set",
            "training.eval_generate=13",
            *TOY_EXAMPLE_FLAGS,
            "--max-steps",
            "20",
            *extra,
        )
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_chrf" in line]
        scores[name] = [(r["eval_chrf"], r["eval_bleu"]) for r in evals]
    assert len(scores["single"]) == 2
    for name in ("zero3", "fsdp"):
        for (c, b), (c1, b1) in zip(scores[name], scores["single"]):
            assert abs(c - c1) < 1e-6 and abs(b - b1) < 1e-6, (name, scores)
