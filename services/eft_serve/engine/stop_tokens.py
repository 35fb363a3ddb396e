"""The ids that end a model's generation: its tokenizer's EOS and its generation config's.

Owns reading them, the same for every engine: the tokenizer's ``eos_token_id``, then the
``eos_token_id`` of the model directory's ``generation_config.json`` (an int or a list, as in
transformers' ``GenerationConfig``: Llama-3-Instruct lists ``<|end_of_text|>`` and ``<|eot_id|>``,
Qwen2.5-Instruct ``<|im_end|>`` and ``<|endoftext|>``), else of its ``config.json`` (which is what
transformers falls back to). Does NOT know engines, merging or serving.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["model_stop_token_ids", "token_ids_of"]


def token_ids_of(value: Any) -> list[int]:
    """The non-negative ids in an ``eos_token_id`` value: an int, a list/tuple of ints, or None."""
    items: Iterable[Any] = value if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in items if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _config_eos(model_dir: Path) -> Any:
    for name in ("generation_config.json", "config.json"):
        try:
            data = json.loads((model_dir / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        text = data.get("text_config")
        for source in (data, text if isinstance(text, dict) else {}):
            if source.get("eos_token_id") is not None:
                return source["eos_token_id"]
    return None


def model_stop_token_ids(tokenizer: Any, model_dir: str | Path | None) -> tuple[int, ...]:
    """The tokenizer's EOS then the model directory's generation-config EOS ids, without repeats."""
    ids = token_ids_of(getattr(tokenizer, "eos_token_id", None))
    if model_dir is not None:
        ids += token_ids_of(_config_eos(Path(model_dir)))
    return tuple(dict.fromkeys(ids))
