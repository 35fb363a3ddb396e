"""Kubernetes manifests for EFT Serve, rendered from the one `EftConfig` tree and validated offline.

Rendering, one concern per module:
`constants` (ports, names), `quantities` (CPU/memory strings), `settings` (the
`k8s/settings/*.yaml` schema), `labels` (names, selectors, metadata), `sizing` (replicas per
pod), `checks` (settings that contradict the config), `manifests.*` (one builder module per
kind of object), `stack` (one environment's objects in apply order), `yaml_dump` (YAML text),
`layout` (repository root and k8s/ folders), `files` (settings -> committed files, drift) and
`render` (the CLI: `python -m eft_serve.k8s.render`).

`validate` checks rendered manifests against the KubeRay CRDs bundled in `schemas/kuberay/`
and the Kubernetes schemas, without a cluster; `resilience_checks` adds what no schema says (no
single point of failure, drain-safe budgets, restricted read-only pods, a TLS front that cannot be
bypassed).
"""
