"""The built-in demo model family: tiny GPT-2 models trained on a synthetic world.

``ensure_demo_family()`` builds (once, cached) five models that share one byte-level BPE tokenizer:
``small_base``, ``small_ft`` (expert A), ``small_ft_b`` (expert B), ``large_base`` and
``large_ft`` (ground truth). The large base knows far more facts of the world than the small
one; the small fine-tunes carry the answer styles, so up-scaling
(large_base + small_ft - small_base) answers held-out questions correctly *and* in style A.
Torch and transformers are imported lazily (``world`` is pure Python).
"""

from eft_serve.demo.world import Question, Style, World, style_of

__all__ = ["DemoFamily", "ROLES", "Question", "Style", "World", "demo_model_path", "ensure_demo_family", "style_of"]


def __getattr__(name: str):
    if name in ("DemoFamily", "ROLES", "ensure_demo_family", "demo_model_path", "default_cache_dir"):
        from eft_serve.demo import family

        return getattr(family, name)
    raise AttributeError(name)
