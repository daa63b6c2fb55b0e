"""Evaluate a tuned model: generate for a data file and score text overlap, JSON extraction and tool calls."""

from typing import Any

from chattune.evaluate.metrics import FAMILIES, evaluate_predictions, parse_json, text_scores, tokenize

_RUN_NAMES = (
    "EvalItem",
    "compute_generation_metrics",
    "eval_from_config",
    "eval_items",
    "generate_rows",
    "run_eval",
    "score_file",
)

__all__ = ["FAMILIES", *_RUN_NAMES, "evaluate_predictions", "parse_json", "text_scores", "tokenize"]


def __getattr__(name: str) -> Any:
    # the command's side imports torch; scoring predictions alone should not pay for that
    if name in _RUN_NAMES:
        from chattune.evaluate import generation, run

        return getattr(generation, name, None) or getattr(run, name)
    raise AttributeError(f"module 'chattune.evaluate' has no attribute {name!r}")
