"""Builders of single Kubernetes objects (dicts), one module per kind of object.

`namespace` (Namespace), `redis` (cache and GCS Redis: Deployments, Services, dev Secret,
secret env refs), `rayservice` (the KubeRay RayService), `services` (the gRPC Service),
`ingress` (the TLS front), `network_policies`, `pdbs` and `pod_monitor` (Prometheus). Each builder is a pure function of `EftConfig` and/or `StackSettings`; none
checks settings against the config (`k8s.checks`) or knows about files (`k8s.files`).
`k8s.stack.render_stack` puts them together in apply order.
"""
