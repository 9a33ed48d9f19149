"""After training: merged models (ONNX and Kubernetes manifests come with the deployment issue)."""
