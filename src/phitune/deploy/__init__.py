"""Manifests for running phitune on Kubernetes: KAITO (kaito.py) and Kubeflow PyTorchJob (kubernetes.py)."""
