"""KAITO and Kubeflow manifests: valid against the CRD schemas (unknown fields rejected, as
kubectl's strict field validation does), KAITO's own admission rules hold, and a config that
cannot be expressed fails with every problem named."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from helpers import REPO, run_cli

jsonschema = pytest.importorskip("jsonschema")
SCHEMAS = Path(__file__).parent / "schemas"


def strict(schema):
    """OpenAPI v3 structural schema -> JSON schema that rejects unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate(doc: dict, schema_file: str) -> list[str]:
    schema = strict(json.loads((SCHEMAS / schema_file).read_text()))
    # metadata is typed only as an object in CRDs; the API server checks it separately.
    schema["properties"]["metadata"] = {"type": "object"}
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
    ]


def _config(tmp_path, **over) -> Path:
    cfg = {
        "model": "microsoft/Phi-3-mini-4k-instruct",
        "method": {"name": "qlora", "r": 16, "alpha": 32},
        "data": {"train": str(REPO / "examples/data/support_train.jsonl"), "validation_split": 0.1, "max_length": 512},
        "training": {"epochs": 2, "batch_size": 16, "gradient_accumulation_steps": 4, "save_every": 100},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        cfg.setdefault(section, {})
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


KAITO_IO = [
    "--input-url",
    "https://example.com/train.jsonl",
    "--output-image",
    "acr.example.io/phi3:1",
    "--push-secret",
    "acr",
]


@pytest.mark.parametrize("method", ["qlora", "lora", "dora"])
def test_kaito_workspace_and_configmap_are_valid(method, tmp_path):
    from phitune.deploy.kaito import kaito_rules

    assert run_cli("kaito", _config(tmp_path, method__name=method), "--output", tmp_path / "k", *KAITO_IO) == 0
    workspace = yaml.safe_load((tmp_path / "k" / "workspace.yaml").read_text())
    configmap = yaml.safe_load((tmp_path / "k" / "configmap.yaml").read_text())
    assert validate(workspace, "kaito-workspace-v1beta1.schema.json") == []
    assert kaito_rules(workspace, configmap) == []
    assert workspace["tuning"]["preset"]["name"] == "phi-3-mini-4k-instruct"
    assert workspace["tuning"]["method"] == ("qlora" if method == "qlora" else "lora")
    tc = yaml.safe_load(configmap["data"]["training_config.yaml"])["training_config"]
    assert tc["QuantizationConfig"]["load_in_4bit"] is (method == "qlora")
    assert (
        tc["LoraConfig"]["r"] == 16
        and tc["LoraConfig"]["lora_alpha"] == 32
        and tc["LoraConfig"].get("use_dora", False) == (method == "dora")
    )
    args = tc["TrainingArguments"]
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"], args["num_train_epochs"]) == (
        4,
        4,
        2.0,
    )
    assert tc["DatasetConfig"]["messages_column"] == "messages" and tc["DatasetConfig"]["train_test_split"] == 0.9


def test_the_schema_check_rejects_what_kubernetes_would():
    good = {
        "apiVersion": "kaito.sh/v1beta1",
        "kind": "Workspace",
        "metadata": {"name": "w"},
        "tuning": {"preset": {"name": "phi-4"}, "method": "lora", "input": {"urls": ["u"]}, "output": {"image": "i"}},
    }
    assert validate(good, "kaito-workspace-v1beta1.schema.json") == []
    typo = copy.deepcopy(good)
    typo["tuning"]["methd"] = typo["tuning"].pop("method")
    assert any("methd" in e for e in validate(typo, "kaito-workspace-v1beta1.schema.json"))
    missing = copy.deepcopy(good)
    del missing["tuning"]["output"]
    assert any("'output' is a required property" in e for e in validate(missing, "kaito-workspace-v1beta1.schema.json"))


def test_kaito_refuses_what_it_cannot_express_all_at_once(tmp_path, capsys):
    cfg = _config(
        tmp_path,
        model="models/tiny-phi3",
        method={"name": "full", "objective": "dpo"},
        distributed={"strategy": "deepspeed"},
        training={"epochs": 1, "batch_size": 8, "keep_best": True, "eval_every": 10},
    )
    assert run_cli("kaito", cfg, "--output", tmp_path / "k", "--input-url", "https://x/y.jsonl") == 2
    err = capsys.readouterr().err
    for needle in (
        "KAITO tunes only its presets",
        "method.name: full",
        "method.objective: dpo",
        "distributed.strategy: deepspeed",
        "keep_best",
        "--output-image",
        "Traceback",
    ):
        assert (needle in err) == (needle != "Traceback"), needle
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize("nodes", [1, 3])
def test_pytorchjob_is_valid_and_runs_phitune_with_torchrun(nodes, tmp_path):
    from phitune.config import parse_config

    cfg = _config(tmp_path, training__batch_size=48, training__gradient_accumulation_steps=2)
    assert (
        run_cli(
            "k8s",
            cfg,
            "--output",
            tmp_path / "j",
            "--image",
            "acr.example.io/phitune:1",
            "--nodes",
            nodes,
            "--gpus-per-node",
            8,
            "--data-pvc",
            "data",
            "--output-pvc",
            "runs",
        )
        == 0
    )
    # 48 examples shared by 3 x 8 processes x 2 accumulation steps, or by 1 x 8 x 2.
    job = yaml.safe_load((tmp_path / "j" / "pytorchjob.yaml").read_text())
    assert validate(job, "pytorchjob-v1.schema.json") == []
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == ({"Master", "Worker"} if nodes > 1 else {"Master"})
    assert specs.get("Worker", {}).get("replicas", 0) == nodes - 1 and job["spec"]["nprocPerNode"] == "8"
    container = specs["Master"]["template"]["spec"]["containers"][0]
    assert (
        container["command"][:4] == ["torchrun", "-m", "phitune", "train"] and "--auto-resume" in container["command"]
    )
    config = yaml.safe_load(yaml.safe_load((tmp_path / "j" / "configmap.yaml").read_text())["data"]["config.yaml"])
    assert (
        config["data"]["train"] == "/data/support_train.jsonl" and config["output_dir"] == "/mnt/output/phitune-train"
    )
    config["data"]["train"] = str(REPO / "examples/data/support_train.jsonl")  # the pod's path, back on this machine
    config["output_dir"] = str(tmp_path / "x")
    assert parse_config(config).training.batch_size == 48  # the same strict schema accepts it


def test_pytorchjob_bad_combinations(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = _config(tmp_path, distributed={"strategy": "none"}, data={"train": "examples/data/support_train.jsonl"})
    assert (
        run_cli(
            "k8s",
            cfg,
            "--output",
            tmp_path / "j",
            "--image",
            "i",
            "--nodes",
            2,
            "--gpus-per-node",
            2,
            "--name",
            "Bad_Name",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--name 'Bad_Name'" in err and "distributed.strategy: none" in err and "--data-pvc" in err
    assert not (tmp_path / "j").exists()


def test_auto_resume_continues_or_starts(tiny_phi3, chat_files, tmp_path):
    from helpers import losses, write_config

    cfg = write_config(tmp_path / "c.json", tiny_phi3, chat_files[0], tmp_path / "out", max_steps=4, save_every=2)
    assert run_cli("train", cfg, "--auto-resume") == 0  # nothing there: starts
    assert len(losses(tmp_path / "out")) == 4
    assert run_cli("train", cfg, "--auto-resume", "--max-steps", "6") == 0  # a checkpoint: continues
    assert [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
