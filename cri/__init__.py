"""A small Kubernetes CRI v1 client (kubelet's side of the CRI), used by tests and `make demo`."""
from cri.client import CriClient, container_config, pod_config

__all__ = ["CriClient", "container_config", "pod_config"]
