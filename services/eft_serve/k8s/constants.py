"""Fixed names and numbers the Kubernetes renderer and its checks share.

Owns: Ray's well-known ports, the Redis port and password variable names, the node-group
resource amount, the `part-of` label value and the render command spelled in generated headers.
Does NOT know: any settings or config (see `settings`), nor how manifests are built.
"""

from __future__ import annotations

from typing import Final

# Ray's well-known ports (see KubeRay's utils/constant.go). The GCS port keeps Ray's legacy
# name "6379"; it has nothing to do with our Redis, which lives in its own pod.
GCS_PORT: Final = 6379
DASHBOARD_PORT: Final = 8265
CLIENT_PORT: Final = 10001
SERVE_HTTP_PORT: Final = 8000
METRICS_PORT: Final = 8080
DASHBOARD_AGENT_PORT: Final = 52365
REDIS_PORT: Final = 6379
REDIS_PASSWORD_ENV: Final = "REDIS_PASSWORD"  # inside the Redis container only
# In Ray pods the cache password gets our own name: KubeRay reserves REDIS_PASSWORD there for
# GCS fault tolerance (it injects it and passes `--redis-password=$REDIS_PASSWORD`).
CACHE_PASSWORD_ENV: Final = "EFT_REDIS_PASSWORD"
# Amount of a node-group resource a node advertises; replicas ask for 0.001 of it
# (`ReplicaConfig.ray_actor_options`), so this only pins placement and never limits packing.
NODE_GROUP_RESOURCE_AMOUNT: Final = 1000
PART_OF: Final = "eft-serve"
# The coordinators' worker group and the resource its pods advertise (never the head's).
COORDINATOR_GROUP: Final = "coordinator"
# Serve's proxy health endpoint on its HTTP port; 503 while the node drains.
PROXY_HEALTH_PATH: Final = "/-/healthz"
# Where Ray keeps its sockets, logs and spill files, and caches (HF, torch): writable emptyDirs
# under a read-only root filesystem.
WRITABLE_DIRS: Final = {"tmp": "/tmp", "cache": "/home/ray/.cache"}
# The module whose CLI renders k8s/; generated files name it, so renaming it changes them all.
RENDER_MODULE: Final = "eft_serve.k8s.render"
RENDER_COMMAND: Final = f"python -m {RENDER_MODULE}"
