"""Kubernetes manifests for EFT Serve, rendered from the one `EftConfig` tree and validated offline.

`render` turns an `EftConfig` plus per-environment settings (`k8s/settings/*.yaml`) into a KubeRay
`RayService`, Redis, the gRPC Service, NetworkPolicies and PodDisruptionBudgets; `validate`
checks rendered manifests against the KubeRay CRD and Kubernetes schemas without a cluster.
"""
