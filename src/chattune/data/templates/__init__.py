"""Templates (one registry): turn canonical samples into (input_ids, labels) for one tokenizer."""

from chattune.data.templates import chatglm3, hf, raw  # noqa: F401  (registers the templates)
from chattune.data.templates.base import (
    IGNORE_INDEX,
    TEMPLATES,
    Encoded,
    Limits,
    ParsedReply,
    Template,
    build_template,
    split_reasoning,
)

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "Encoded",
    "Limits",
    "ParsedReply",
    "Template",
    "build_template",
    "split_reasoning",
]
