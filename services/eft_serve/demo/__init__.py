"""The built-in demo model family: tiny GPT-2 models trained on a synthetic world.

``ensure_demo_family()`` builds (once, cached) five models that share one byte-level BPE tokenizer:
``small_base``, ``small_ft`` (expert A), ``small_ft_b`` (expert B), ``large_base`` and
``large_ft`` (ground truth). The large base knows far more facts of the world than the small
one; the small fine-tunes carry the answer styles, so up-scaling
(large_base + small_ft - small_base) answers held-out questions correctly *and* in style A.

A leaf package: `world` (the synthetic world), `tokenizer`, `build_spec` (sizes, steps, data mix),
`train` (one model's training and evaluation) and `family` (the cached build of all roles). It
imports nothing of the service (stack, serve, transport, client). Importing it loads no torch:
only building a family or training does.
"""

from eft_serve.demo.family import ROLES, DemoFamily, default_cache_dir, demo_model_path, ensure_demo_family
from eft_serve.demo.world import Question, Style, World, style_of

__all__ = [
    "ROLES",
    "DemoFamily",
    "Question",
    "Style",
    "World",
    "default_cache_dir",
    "demo_model_path",
    "ensure_demo_family",
    "style_of",
]
