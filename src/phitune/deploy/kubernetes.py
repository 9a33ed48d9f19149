"""`phitune k8s`: `phitune train` itself on a Kubernetes cluster, N nodes x G GPUs, as a Kubeflow
PyTorchJob (training-operator v1). The operator starts one pod per node and sets torchrun's
PET_NNODES / PET_NPROC_PER_NODE / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT, so the pod
command is plain `torchrun -m phitune train CONFIG`; the config travels in a ConfigMap. Unlike
KAITO this runs every phitune feature (tasks, DPO, ZeRO/FSDP, exact resume), at the price of
bringing your own image (one with `pip install phitune[all]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from phitune.deploy.kaito import DNS_NAME
from phitune.errors import PhituneError

if TYPE_CHECKING:
    from phitune.config import Config

CONFIG_DIR = "/etc/phitune"
DATA_DIR = "/data"
OUTPUT_DIR = "/mnt/output"


def pytorchjob_manifests(
    cfg: Config,
    *,
    name: str,
    image: str,
    nodes: int = 1,
    gpus_per_node: int = 1,
    data_pvc: str | None = None,
    output_pvc: str | None = None,
    namespace: str | None = None,
) -> tuple[dict, dict]:
    """(ConfigMap, PyTorchJob), or one PhituneError listing every problem."""
    from phitune.config import dump_config

    _check_job(cfg, name, nodes, gpus_per_node, data_pvc)
    updates: dict[str, Any] = {"output_dir": f"{OUTPUT_DIR}/{name}"}
    if data_pvc:
        updates["data"] = cfg.data.model_copy(
            update={k: f"{DATA_DIR}/{Path(v).name}" for k in ("train", "validation") if (v := getattr(cfg.data, k))}
        )
    pod_cfg = cfg.model_copy(update=updates)
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**meta, "name": f"{name}-config"},
        "data": {"config.yaml": dump_config(pod_cfg)},
    }
    template = {"spec": _pod_spec(name, image, gpus_per_node, data_pvc, output_pvc)}
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if nodes > 1:
        replicas["Worker"] = {"replicas": nodes - 1, "restartPolicy": "OnFailure", "template": template}
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": meta,
        "spec": {
            "nprocPerNode": str(gpus_per_node),
            "runPolicy": {"cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": replicas,
        },
    }
    return configmap, job


def _check_job(cfg, name: str, nodes: int, gpus_per_node: int, data_pvc: str | None) -> None:
    from phitune.training.distributed import check_batch, resolve_strategy

    problems = []
    if not DNS_NAME.match(name) or len(name) > 52:  # pods get "-master-0" / "-worker-N" appended
        problems.append(
            f"--name {name!r}: must be a DNS label of at most 52 characters (lower-case letters, digits, '-')"
        )
    if nodes < 1 or gpus_per_node < 1:
        problems.append(f"--nodes {nodes} / --gpus-per-node {gpus_per_node}: both must be at least 1")
    world = max(nodes, 1) * max(gpus_per_node, 1)
    for check in (lambda: resolve_strategy(cfg, world), lambda: check_batch(cfg, world)):
        try:
            check()
        except PhituneError as exc:
            problems.append(str(exc))
    for key in ("train", "validation"):
        path = getattr(cfg.data, key)
        if path and not data_pvc and not path.startswith(("/", "s3://", "gs://")):
            problems.append(
                f"data.{key} {path!r} is a local path: pass --data-pvc CLAIM (the files mounted at "
                f"{DATA_DIR}) or bake them into the image at an absolute path"
            )
    if problems:
        raise PhituneError(f"this config cannot run as a PyTorchJob ({len(problems)} problem(s))", problems=problems)


def _pod_spec(name: str, image: str, gpus_per_node: int, data_pvc: str | None, output_pvc: str | None) -> dict:
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}, {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [
        {"name": "config", "configMap": {"name": f"{name}-config"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    for vol, claim, path in (("data", data_pvc, DATA_DIR), ("output", output_pvc, OUTPUT_DIR)):
        if claim:
            mounts.append({"name": vol, "mountPath": path})
            volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim}})
    container = {
        "name": "pytorch",  # the operator finds the training container by this name
        "image": image,
        # A restarted pod continues from the newest checkpoint instead of refusing a non-empty output_dir.
        "command": ["torchrun", "-m", "phitune", "train", f"{CONFIG_DIR}/config.yaml", "--auto-resume"],
        "resources": {"limits": {"nvidia.com/gpu": gpus_per_node}},
        "volumeMounts": mounts,
    }
    return {"containers": [container], "volumes": volumes}
