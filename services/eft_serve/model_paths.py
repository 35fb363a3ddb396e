"""Where a pool's model lives: local Hugging Face directories or the built-in demo family.

Owns resolving a `PoolConfig.model` string to a directory. `demo:<role>` builds the demo family
on first use (cached); anything else must be an existing local directory (a model, or a PEFT
LoRA adapter: `eft_serve.adapters` links it to its base) — there is no hub
download here, so a typo fails fast with the path in the message.

Does NOT know how models are loaded or served (the engine and the Serve deployments, which call
this) nor how the demo family is built (`eft_serve.demo.family`).
"""

from __future__ import annotations

from pathlib import Path

from eft_serve.config import DEMO_SCHEME
from eft_serve.demo.family import ensure_demo_family
from eft_serve.engine.lora import is_adapter_dir
from eft_serve.errors import InvalidArgument


def resolve_model_path(spec: str) -> Path:
    """The directory of the model `spec` names: `demo:<role>` or a local Hugging Face model directory."""
    if spec.startswith(DEMO_SCHEME):
        role = spec[len(DEMO_SCHEME) :]
        family = ensure_demo_family()
        if role not in family.paths:
            raise InvalidArgument(f"the demo family has no model {role!r}; it has {sorted(family.paths)}")
        return family.paths[role]
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file() and not is_adapter_dir(path):
        raise InvalidArgument(
            f"model directory {str(path)!r} has no config.json (nor adapter_config.json); give a local Hugging "
            f"Face model directory (save_pretrained output), a PEFT LoRA adapter directory or demo:<role>"
        )
    return path
