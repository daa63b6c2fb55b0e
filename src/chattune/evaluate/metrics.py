"""Scores for predictions against references: text overlap, structured extraction, tool calls (pure functions).

Every score is on a 0-100 scale; keys named `samples` or `*_samples` are counts. A row is a dict with
`prediction` and `reference` (text), plus for tool-call references `reference_tool_calls` (a list of
`{"name", "arguments"}`) and optionally `prediction_tool_calls` / `prediction_error` (what the template's
`parse_reply` found; without them the calls are read back from the prediction text).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from statistics import fmean
from typing import Any

from chattune.errors import ChattuneError, ConfigError
from chattune.registry import Registry

Row = dict[str, Any]

# CJK ideographs (incl. extension A and compatibility) and Japanese kana: scripts written without spaces
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD_RE = re.compile(r"\w+|[^\w\s]")
_FENCE_RE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)
_DISPLAY_CALL_RE = re.compile(r"^\s*([^\s(){}]+)\((\{.*\})\)\s*$")
AUTO_JSON_SHARE = 0.8


@dataclass(frozen=True)
class MetricOptions:
    """Knobs of the metric families: `record_keys` compares extraction records on these keys only."""

    record_keys: tuple[str, ...] | None = None


Family = Callable[[Sequence[Row], MetricOptions], dict[str, float]]
FAMILIES: Registry[Family] = Registry("metric family", ConfigError)


def is_count(name: str) -> bool:
    """Whether a metric key is a sample count rather than a 0-100 score."""
    return name == "samples" or name.endswith("_samples")


# ---------------------------------------------------------------- text: ROUGE and BLEU on words


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ChattuneError(
            f"text metrics need {module.split('.')[0]}: pip install 'chattune[eval]' "
            "(jieba, rouge-chinese, nltk)"
        ) from None


@cache
def _jieba() -> Any:
    import logging

    jieba = _need("jieba")
    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading banner would interleave with our output
    return jieba


def has_cjk(text: str) -> bool:
    """Whether the text contains Chinese/Japanese characters (which are written without spaces)."""
    return _CJK_RE.search(text) is not None


def tokenize(text: str, cjk: bool | None = None) -> list[str]:
    """Words: jieba segmentation for CJK text (as the ChatGLM3 finetune demo), words and punctuation otherwise."""
    if cjk is None:
        cjk = has_cjk(text)
    if cjk:
        # jieba yields whitespace as tokens; dropping them keeps the words-only view the demo intends
        return [t for t in _jieba().cut(text) if t.strip()]
    return _WORD_RE.findall(text)


def text_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F and BLEU-4 (×100) of one prediction; 0 when either side has no words."""
    cjk = has_cjk(prediction) or has_cjk(reference)  # both sides split the same way, or words cannot match
    pred, ref = tokenize(prediction, cjk), tokenize(reference, cjk)
    if not pred or not ref:  # rouge-chinese raises on an empty hypothesis; an empty answer is simply wrong
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    rouge = _need("rouge_chinese").Rouge()
    bleu = _need("nltk.translate.bleu_score")
    scores = rouge.get_scores(" ".join(pred), " ".join(ref))[0]
    out = {k: scores[k]["f"] * 100 for k in ("rouge-1", "rouge-2", "rouge-l")}
    smooth = bleu.SmoothingFunction().method3
    out["bleu-4"] = bleu.sentence_bleu([ref], pred, smoothing_function=smooth) * 100
    return out


@FAMILIES.register("text")
def text_metrics(rows: Sequence[Row], options: MetricOptions) -> dict[str, float]:
    """Mean ROUGE-1/2/L and BLEU-4 over rows (the ChatGLM3 finetune demo's metrics, ×100)."""
    per = [text_scores(r.get("prediction") or "", r.get("reference") or "") for r in rows]
    out = {k: fmean(s[k] for s in per) for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}
    return out | {"text_samples": len(rows)}


# ---------------------------------------------------------------- extraction: JSON records and labels


def parse_json(text: str | None) -> Any:
    """The JSON object or array in a reply (inside a ```json fence if there is one), or None when there is none."""
    if not text:
        return None
    body = text.strip()
    fence = _FENCE_RE.search(body)
    if fence is not None:
        body = fence.group(1).strip()
    try:
        value = json.loads(body)
    except ValueError:
        return None
    # scalars are not structured answers: "42" or "true" should be scored as text, not as extraction
    return value if isinstance(value, dict | list) else None


def _canonical(value: Any, keys: tuple[str, ...] | None = None) -> str:
    if keys is not None and isinstance(value, dict):
        value = {k: value.get(k) for k in keys}
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _kind(reference: Any) -> str | None:
    """'records' (objects), 'labels' (scalars), or None for an empty list (decided by the rest of the data)."""
    items = [reference] if isinstance(reference, dict) else reference
    if not items:
        return None
    return "records" if all(isinstance(x, dict) for x in items) else "labels"


def _items(value: Any, kind: str, keys: tuple[str, ...] | None) -> Counter[str]:
    """A parsed answer as a multiset of canonical items (duplicates count: predicting a record twice is wrong)."""
    if value is None:
        return Counter()
    items = [value] if isinstance(value, dict) else value
    if kind == "labels":
        return Counter(x.strip() if isinstance(x, str) else _canonical(x) for x in items)
    return Counter(_canonical(x, keys) for x in items)


def _prf(hit: int, predicted: int, gold: int) -> dict[str, float]:
    p = hit / predicted if predicted else 0.0
    r = hit / gold if gold else 0.0
    return {"precision": p * 100, "recall": r * 100, "f1": (2 * p * r / (p + r) if p + r else 0.0) * 100}


@FAMILIES.register("extraction")
def extraction_metrics(rows: Sequence[Row], options: MetricOptions) -> dict[str, float]:
    """Parse rate and exact match of JSON answers; micro P/R/F1 over records (objects) and over labels.

    An unparseable prediction predicts nothing: it is not an exact match and misses every reference item.
    Rows whose reference is not a JSON object/array are left out.
    """
    parsed = [(parse_json(r.get("reference")), parse_json(r.get("prediction"))) for r in rows]
    parsed = [(ref, pred) for ref, pred in parsed if ref is not None]
    out: dict[str, float] = {"extraction_samples": len(parsed)}
    if not parsed:
        return out
    kinds = [_kind(ref) for ref, _ in parsed]
    default = "records" if "records" in kinds else "labels"
    scored = []  # (kind, reference items, predicted items, prediction parsed)
    for (ref, pred), kind in zip(parsed, kinds, strict=True):
        kind = kind or default
        keys = options.record_keys
        scored.append((kind, _items(ref, kind, keys), _items(pred, kind, keys), pred is not None))
    out["json_parse_rate"] = fmean(ok for *_, ok in scored) * 100
    out["exact_match"] = fmean(ok and gold == got for _, gold, got, ok in scored) * 100
    for kind, prefix in (("records", "record"), ("labels", "label")):
        pairs = [(gold, got) for k, gold, got, _ in scored if k == kind]
        if not pairs:
            continue
        right = [ok and gold == got for k, gold, got, ok in scored if k == kind]
        hit = sum(sum((gold & got).values()) for gold, got in pairs)
        predicted, gold_total = sum(sum(g.values()) for _, g in pairs), sum(sum(g.values()) for g, _ in pairs)
        if kind == "labels":  # the label-list tasks' "accuracy": the whole list right
            out["label_accuracy"] = fmean(right) * 100
        prf = _prf(hit, predicted, gold_total)
        out |= {f"{prefix}_{k}": v for k, v in prf.items()} | {f"{prefix}_samples": len(pairs)}
    return out


# ---------------------------------------------------------------- tool calls


def calls_from_text(text: str) -> list[dict[str, Any]] | None:
    """Tool calls read back from a displayed reply (`name({json})` lines, or one `{"name", "arguments"}` object)."""
    calls = []
    for line in text.strip().splitlines():
        m = _DISPLAY_CALL_RE.match(line)
        if m is None:
            continue
        try:
            calls.append({"name": m.group(1), "arguments": json.loads(m.group(2))})
        except ValueError:
            return None
    if calls:
        return calls
    obj = parse_json(text)
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        args = obj.get("arguments", obj.get("parameters", {}))
        return [{"name": obj["name"], "arguments": args}] if isinstance(args, dict) else None
    return None


def _predicted_calls(row: Row) -> list[dict[str, Any]] | None:
    """The row's predicted calls, or None when the reply has no well-formed call."""
    if "prediction_tool_calls" in row or "prediction_error" in row:
        if row.get("prediction_error"):
            return None
        return list(row.get("prediction_tool_calls") or []) or None
    return calls_from_text(row.get("prediction") or "")


def _call_key(call: dict[str, Any]) -> str:
    return _canonical({"name": call.get("name"), "arguments": call.get("arguments") or {}})


def is_tool_row(row: Row) -> bool:
    """Whether the reference answer is a tool call."""
    return bool(row.get("reference_tool_calls"))


@FAMILIES.register("tool")
def tool_metrics(rows: Sequence[Row], options: MetricOptions) -> dict[str, float]:
    """For tool-call references: parse rate of predicted calls, name accuracy, exact match of name + arguments."""
    rows = [r for r in rows if is_tool_row(r)]
    out: dict[str, float] = {"tool_samples": len(rows)}
    if not rows:
        return out
    parsed, names, exact = [], [], []
    for r in rows:
        gold = r["reference_tool_calls"]
        got = _predicted_calls(r) or []
        parsed.append(bool(got))
        # parallel calls: the same multiset of names / calls, in any order
        names.append(
            bool(got) and Counter(c.get("name") for c in gold) == Counter(c.get("name") for c in got)
        )
        exact.append(bool(got) and Counter(map(_call_key, gold)) == Counter(map(_call_key, got)))
    return out | {
        "tool_parse_rate": fmean(parsed) * 100,
        "tool_name_accuracy": fmean(names) * 100,
        "tool_args_exact_match": fmean(exact) * 100,
    }


# ---------------------------------------------------------------- choosing families, the one entry point


def metric_names(metrics: str | Sequence[str]) -> list[str] | None:
    """The family names asked for (None for auto); accepts a list or a comma-separated string."""
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else [*metrics]
    names = [n for n in names if n]
    if not names or names == ["auto"]:
        return None
    if "auto" in names:
        raise ConfigError("metrics: 'auto' cannot be combined with named metric families")
    for n in names:
        FAMILIES.get(n)  # a clear error, with a did-you-mean, for unknown names
    return names


def choose_families(rows: Sequence[Row], metrics: str | Sequence[str] = "auto") -> dict[str, list[Row]]:
    """Which family scores which rows (named families score every row they fit).

    auto: tool-call references → tool; the rest → extraction when ≥ 80% of their references are JSON
    objects/arrays, text otherwise.
    """
    tool_rows = [r for r in rows if is_tool_row(r)]
    other = [r for r in rows if not is_tool_row(r) and r.get("reference") is not None]
    names = metric_names(metrics)
    if names is None:
        chosen: dict[str, list[Row]] = {"tool": tool_rows} if tool_rows else {}
        if other:
            share = fmean(parse_json(r["reference"]) is not None for r in other)
            chosen["extraction" if share >= AUTO_JSON_SHARE else "text"] = other
        return chosen
    return {n: tool_rows if n == "tool" else other for n in names}


def evaluate_predictions(
    rows: Sequence[Row], metrics: str | Sequence[str] = "auto", *, record_keys: Sequence[str] | None = None
) -> dict[str, float]:
    """Scores (0-100) and counts for rows `{input, prediction, reference, [reference_tool_calls, ...]}`."""
    options = MetricOptions(tuple(record_keys) if record_keys else None)
    chosen = choose_families(rows, metrics)
    out: dict[str, float] = {}
    for name, subset in chosen.items():
        out |= FAMILIES.get(name)(subset, options)
    out["samples"] = sum(1 for r in rows if is_tool_row(r) or r.get("reference") is not None)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
