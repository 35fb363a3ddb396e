"""Offline validation of rendered Kubernetes manifests: no cluster, no network.

Owns four checks, each returning messages that name the object and the field path:

1. Custom resources (`RayService`, `RayCluster`) against the KubeRay CRD's openAPIV3Schema,
   bundled with this package in `schemas/kuberay/` (see its SOURCE.md), made strict: CRD
   schemas never say `additionalProperties: false`, so every object schema with `properties`
   (and without `x-kubernetes-preserve-unknown-fields`) gets it here; a misspelled or misplaced
   field fails.
2. Core objects (Namespace, Secret, Deployment, Service, NetworkPolicy, PodDisruptionBudget)
   against the Kubernetes OpenAPI schemas bundled by `kubernetes-validate`, strict mode.
3. `serveConfigV2` through `eft_serve.serve.config_check.check_serve_config`.
4. Cross-object facts one schema cannot see (`release_checks`): every pool's node-group resource
   advertised by exactly one worker group, GPUs where replicas need them, selectors that select
   something, every pod isolated by a NetworkPolicy, the cache url pointing at a rendered Service;
   and (`resilience_checks`) no single point of failure (proxies on every node, ≥ 2 coordinators off
   the head, GCS fault tolerance, budgets that never block drains nor evict a lone pod), Pod
   Security `restricted` with read-only roots, a gRPC-speaking TLS Ingress as the only way in.
5. PodMonitor (its CRD is not bundled) field by field.

Also reads a kustomize directory (resources + namespace only) so overlays are checked as built.
Does NOT know how manifests are rendered (`k8s.files`, `k8s.manifests`), and cannot evaluate
CEL rules (`x-kubernetes-validations`) or anything that needs the API server (admission, quotas).
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from eft_serve.k8s.layout import RepoRootNotFound, find_repo_root, output_dir, overlays_dir
from eft_serve.k8s.release_checks import check_release, object_name
from eft_serve.k8s.resilience_checks import check_pod_monitor
from eft_serve.serve.config_check import check_serve_config

DEFAULT_K8S_VERSION = "1.30"
CORE_KINDS = {
    ("v1", "Namespace"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("apps/v1", "Deployment"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "Ingress"),
}
# Custom resources whose CRD is not bundled: checked field by field (`resilience_checks`).
OTHER_CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"): check_pod_monitor}
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


# ---------------------------------------------------------------------------- locating inputs


# Package data (pyproject.toml ships `k8s/schemas/kuberay/*`), so it is there when installed too.
BUNDLED_KUBERAY_DIR = Path(__file__).resolve().parent / "schemas" / "kuberay"


def kuberay_schema_dir(directory: Path | None = None) -> Path:
    """A directory holding the KubeRay CRD files (default: the copy bundled with this package)."""
    d = Path(directory).resolve() if directory is not None else BUNDLED_KUBERAY_DIR
    missing = [f for f in CRD_FILES.values() if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"KubeRay CRD schemas not found: {d} lacks {', '.join(missing)}. The package bundles them "
            f"in {BUNDLED_KUBERAY_DIR} (see SOURCE.md there); a directory given instead must hold "
            f"{', '.join(sorted(CRD_FILES.values()))} from the same KubeRay release."
        )
    return d


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load_kustomization(directory: Path) -> list[dict[str, Any]]:
    """The objects a kustomize directory builds, for the two features we use: `resources`
    (files and directories) and `namespace`. Anything else is refused, not ignored."""
    k_path = directory / "kustomization.yaml"
    k = yaml.safe_load(k_path.read_text()) or {}
    unsupported = set(k) - {"apiVersion", "kind", "resources", "namespace"}
    if unsupported:
        raise ValueError(f"{k_path}: kustomize features this checker does not emulate: {sorted(unsupported)}")
    docs: list[dict[str, Any]] = []
    for res in k.get("resources") or []:
        target = (directory / res).resolve()
        docs += load_kustomization(target) if target.is_dir() else load_documents(target)
    ns = k.get("namespace")
    if ns:
        for d in docs:
            if d.get("kind") != "Namespace":
                d.setdefault("metadata", {})["namespace"] = ns
    return docs


# ---------------------------------------------------------------------------- CRD schemas


def strict_schema(schema: Any) -> Any:
    """A copy of an openAPIV3Schema in which unknown object fields are errors."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.lru_cache(maxsize=8)
def _crd_validator(path: str, version: str) -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(Path(path).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = strict_schema(v["schema"]["openAPIV3Schema"])
            return jsonschema.Draft202012Validator(schema)
    raise ValueError(f"{path} has no version {version!r}")


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def validate_custom(doc: dict[str, Any], kuberay_dir: Path) -> list[str]:
    kind: str = doc["kind"]
    api: str = doc.get("apiVersion", "")
    group, _, version = api.partition("/")
    if group != "ray.io":
        return [f"apiVersion {api!r}: expected ray.io/<version>"]
    validator = _crd_validator(str(kuberay_dir / CRD_FILES[kind]), version)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    problems = [f"{_path(e.absolute_path)}: {e.message}" for e in errors]
    # The CRD leaves metadata as a bare object; hold it to what an ObjectMeta we write may hold.
    problems += _check_metadata(doc.get("metadata"))
    return problems


def _check_metadata(meta: Any) -> list[str]:
    if not isinstance(meta, dict):
        return ["metadata: must be a mapping"]
    allowed = {"name", "namespace", "labels", "annotations"}
    problems = [
        f"metadata.{k}: unexpected field (allowed here: {', '.join(sorted(allowed))})" for k in meta if k not in allowed
    ]
    if not meta.get("name"):
        problems.append("metadata.name: required")
    for key in ("labels", "annotations"):
        if key in meta and not all(isinstance(v, str) for v in (meta[key] or {}).values()):
            problems.append(f"metadata.{key}: values must be strings")
    return problems


# ---------------------------------------------------------------------------- core objects


def validate_core(doc: dict[str, Any], k8s_version: str) -> list[str]:
    try:
        from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, validate
    except ImportError:
        # A silent pass would be worse than a failure: the dependency is part of the dev tools.
        return ["kubernetes-validate is not installed (pip install kubernetes-validate): core objects unchecked"]
    try:
        validate(doc, k8s_version, strict=True)
    except ValidationError as e:
        return [f"{_path(e.absolute_path)}: {e.message}"]
    except SchemaNotFoundError as e:
        return [e.message]
    return []


# ---------------------------------------------------------------------------- one manifest


def validate_manifest(doc: dict[str, Any], kuberay_dir: Path, k8s_version: str = DEFAULT_K8S_VERSION) -> list[str]:
    """Schema problems of one object, each prefixed with `Kind/namespace/name:`."""
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        return ["<document>: not a Kubernetes object (needs apiVersion and kind)"]
    kind = doc["kind"]
    if kind in CRD_FILES:
        problems = validate_custom(doc, kuberay_dir)
        if kind == "RayService":
            problems += [f"spec.serveConfigV2: {p}" for p in _check_serve(doc)]
    elif (doc["apiVersion"], kind) in CORE_KINDS:
        problems = validate_core(doc, k8s_version)
    elif (doc["apiVersion"], kind) in OTHER_CUSTOM_KINDS:
        problems = OTHER_CUSTOM_KINDS[(doc["apiVersion"], kind)](doc)
    else:
        problems = [f"kind {kind!r} ({doc['apiVersion']}) is none this checker knows"]
    return [f"{object_name(doc)}: {p}" for p in problems]


def _check_serve(doc: dict[str, Any]) -> list[str]:
    text = (doc.get("spec") or {}).get("serveConfigV2")
    if not isinstance(text, str):
        return ["missing (a Serve config YAML string)"]
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"not YAML: {e}"]
    problems = check_serve_config(data)
    http = (data or {}).get("http_options") or {} if isinstance(data, dict) else {}
    if http.get("host") not in ("0.0.0.0", "::"):
        # KubeRay probes http://<pod IP>:<serve port>/-/healthz to mark the head ready to serve.
        problems.append(
            f"http_options.host: {http.get('host')!r} is unreachable for KubeRay's proxy health probe; use 0.0.0.0"
        )
    return problems


# ---------------------------------------------------------------------------- entry points


def validate_documents(
    docs: Sequence[dict[str, Any]], kuberay_dir: Path, k8s_version: str = DEFAULT_K8S_VERSION
) -> list[str]:
    """Schema problems of every object, then the cross-object ones (empty = OK)."""
    problems: list[str] = []
    for d in docs:
        problems += validate_manifest(d, kuberay_dir, k8s_version)
    return problems + check_release(docs)


def load_target(path: Path) -> list[dict[str, Any]]:
    """A kustomize directory (as built), a directory of YAML files, or one file."""
    if path.is_dir():
        if (path / "kustomization.yaml").is_file():
            return load_kustomization(path)
        return [d for f in sorted(path.glob("*.yaml")) for d in load_documents(f)]
    return load_documents(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m eft_serve.k8s.validate",
        description="Validate rendered manifests offline (KubeRay CRDs, Kubernetes schemas, Serve config).",
    )
    p.add_argument(
        "targets",
        nargs="*",
        type=Path,
        help="kustomize dirs, manifest dirs or files (default: k8s/base and every k8s/overlays/*)",
    )
    p.add_argument("--kubernetes-version", default=DEFAULT_K8S_VERSION)
    p.add_argument(
        "--root",
        type=Path,
        help="repository root, for the default targets (default: the nearest "
        "directory at or above the current one holding pyproject.toml and k8s/)",
    )
    p.add_argument(
        "--kuberay-schemas",
        type=Path,
        help="directory with the KubeRay CRD files (default: the copy bundled with the package)",
    )
    args = p.parse_args(argv)
    targets: list[Path] = args.targets
    if not targets:
        try:
            root = (args.root or find_repo_root()).resolve()
        except RepoRootNotFound as e:
            p.error(str(e))
        targets = [output_dir(root, "base"), *sorted(overlays_dir(root).iterdir())]
    try:
        kuberay = kuberay_schema_dir(args.kuberay_schemas)
    except FileNotFoundError as e:
        p.error(str(e))
    failed = False
    for t in targets:
        problems = validate_documents(load_target(t), kuberay, args.kubernetes_version)
        for line in problems:
            print(f"{t}: {line}")
        print(f"{t}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
