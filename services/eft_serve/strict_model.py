"""The base of every config model: pydantic, and unknown keys are an error, not silently ignored.

Owns that one rule (a typo in a YAML key must fail loudly), and that a field's docstring (the
string right below it) is its description, which the configuration reference is generated from
(`eft_serve.config_docs`). Knows nothing of what is configured.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
