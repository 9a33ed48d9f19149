"""Kubernetes manifests: `phitune kaito` (a KAITO Workspace) and `phitune k8s` (a Kubeflow PyTorchJob)."""

from __future__ import annotations

import argparse
from pathlib import Path

from phitune.argtypes import positive_int
from phitune.errors import PhituneError


def _write_manifests(output: Path, docs: dict[str, dict], overwrite: bool) -> None:
    import yaml

    from phitune.outputs import refuse_non_empty

    refuse_non_empty(output, overwrite)

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(
            self, data: object
        ) -> bool:  # kubectl reads anchors, people reading the file should not need to
            return True

    # Multi-line strings (the configs inside ConfigMaps) as literal blocks, readable in the file.
    Dumper.add_representer(
        str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None)
    )
    output.mkdir(parents=True, exist_ok=True)
    for name, doc in docs.items():
        (output / name).write_text(yaml.dump(doc, Dumper=Dumper, sort_keys=False))
    print(f"wrote {', '.join(str(output / n) for n in docs)}; apply with: kubectl apply -f {output}")


def cmd_kaito(args: argparse.Namespace) -> int:
    from phitune.config import load_config
    from phitune.deploy.kaito import kaito_manifests, kaito_rules

    cfg = load_config(args.config, list(args.set or []))
    workspace, configmap = kaito_manifests(
        cfg,
        name=args.name,
        instance_type=args.instance_type,
        input_urls=args.input_url,
        input_image=args.input_image,
        output_image=args.output_image,
        push_secret=args.push_secret,
        output_volume=args.output_pvc,
        preset=args.preset,
    )
    broken = kaito_rules(workspace, configmap)
    if broken:  # our translation broke one of KAITO's own admission rules: a bug here, not in the config
        raise PhituneError("internal: the KAITO manifests break KAITO's rules", problems=broken)
    _write_manifests(Path(args.output), {"configmap.yaml": configmap, "workspace.yaml": workspace}, args.overwrite)
    return 0


def cmd_k8s(args: argparse.Namespace) -> int:
    from phitune.config import load_config
    from phitune.deploy.kubernetes import pytorchjob_manifests

    cfg = load_config(args.config, list(args.set or []))
    configmap, job = pytorchjob_manifests(
        cfg,
        name=args.name,
        image=args.image,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        data_pvc=args.data_pvc,
        output_pvc=args.output_pvc,
        namespace=args.namespace,
    )
    _write_manifests(Path(args.output), {"configmap.yaml": configmap, "pytorchjob.yaml": job}, args.overwrite)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
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

    ks = sub.add_parser(
        "k8s", help="a Kubeflow PyTorchJob + ConfigMap running `phitune train` with torchrun on N nodes"
    )
    ks.add_argument("config", help="phitune training config (YAML)")
    ks.add_argument("--output", required=True, help="directory for pytorchjob.yaml and configmap.yaml")
    ks.add_argument(
        "--image", required=True, help="container image with phitune installed (pip install 'phitune[all]')"
    )
    ks.add_argument("--name", default="phitune-train", help="job name (DNS label)")
    ks.add_argument("--nodes", type=positive_int, default=1)
    ks.add_argument("--gpus-per-node", type=positive_int, default=1)
    ks.add_argument("--data-pvc", help="PersistentVolumeClaim holding the data files (mounted at /data)")
    ks.add_argument("--output-pvc", help="PersistentVolumeClaim for output_dir (mounted at /mnt/output)")
    ks.add_argument("--namespace")
    ks.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    ks.add_argument("--overwrite", action="store_true")
    ks.set_defaults(func=cmd_k8s)
