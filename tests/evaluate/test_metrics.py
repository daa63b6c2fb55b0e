"""Metric functions on hand-computed cases, an independent n-gram computation, and the tutorial's real data."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from chattune.errors import ConfigError
from chattune.evaluate.metrics import (
    calls_from_text,
    choose_families,
    evaluate_predictions,
    is_count,
    parse_json,
    text_scores,
    tokenize,
)

SHARED = Path(__file__).resolve().parents[3] / "shared"
MIXED = SHARED / "data" / "seed001-mixed" / "train.jsonl"


def rows(pairs, **extra):
    return [{"input": "q", "prediction": p, "reference": r, **extra} for p, r in pairs]


# ---------------------------------------------------------------- tokenisation


def test_english_is_split_into_words_and_punctuation():
    assert tokenize("Hello, world! It's 9.99") == ["Hello", ",", "world", "!", "It", "'", "s", "9", ".", "99"]


def test_chinese_is_segmented_with_jieba_without_whitespace_tokens():
    assert tokenize("我爱北京天安门") == ["我", "爱", "北京", "天安门"]
    assert tokenize("Hello 世界, ok") == ["Hello", "世界", ",", "ok"]


# ---------------------------------------------------------------- text: hand-computed


def test_english_scores_by_hand():
    s = text_scores("the cat sat on a mat", "the cat sat on the mat")
    # unigram sets: hyp 6 (the cat sat on a mat), ref 5, overlap 5 → P 5/6, R 1
    assert s["rouge-1"] == pytest.approx(100 * 10 / 11, abs=1e-4)
    # bigram sets: 5 and 5, overlap 3 (the cat, cat sat, sat on)
    assert s["rouge-2"] == pytest.approx(60.0, abs=1e-4)
    # LCS "the cat sat on mat" = 5 of 6 words on both sides
    assert s["rouge-l"] == pytest.approx(100 * 5 / 6, abs=1e-4)
    # modified precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty), no smoothing needed
    assert s["bleu-4"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)


def test_chinese_scores_by_hand():
    s = text_scores("我爱北京", "我爱北京天安门")  # [我 爱 北京] vs [我 爱 北京 天安门]
    assert s["rouge-1"] == pytest.approx(100 * 6 / 7, abs=1e-4)  # P 1, R 3/4
    assert s["rouge-2"] == pytest.approx(80.0, abs=1e-4)  # P 2/2, R 2/3
    assert s["rouge-l"] == pytest.approx(100 * 6 / 7, abs=1e-4)
    # p1..p3 = 1, p4 has no 4-gram: method3 smooths it to 1/2; brevity penalty exp(1 - 4/3)
    assert s["bleu-4"] == pytest.approx(100 * math.exp(1 - 4 / 3) * 0.5**0.25, abs=1e-6)


def test_chinese_sentences_by_hand():
    s = text_scores("今天天气不错，我们去公园吧。", "今天天气很好。我们去公园散步吧！")
    assert s["rouge-1"] == pytest.approx(100 * 2 / 3, abs=1e-4)  # 6 shared of 8 and 10 words
    assert s["rouge-2"] == pytest.approx(25.0, abs=1e-4)  # 我们去, 去公园 of 7 and 9 bigrams
    assert s["rouge-l"] == pytest.approx(100 * 5 / 9, abs=1e-4)  # LCS 5 of 8 and 10


def _ngram_f(hyp: list[str], ref: list[str], n: int) -> float:
    """ROUGE-N F on n-gram sets, as rouge-chinese (and the demo) count them, written from the definition."""
    h = {tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1)}
    r = {tuple(ref[i : i + n]) for i in range(len(ref) - n + 1)}
    if not h or not r or not h & r:
        return 0.0
    p, rec = len(h & r) / len(h), len(h & r) / len(r)
    return 100 * 2 * p * rec / (p + rec)


def _lcs_f(hyp: list[str], ref: list[str]) -> float:
    prev = [0] * (len(ref) + 1)
    for a in hyp:
        cur = [0]
        for j, b in enumerate(ref):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 100 * 2 * lcs / (len(hyp) + len(ref)) if lcs else 0.0


def _bleu(hyp: list[str], ref: list[str]) -> float:
    """BLEU-4 without smoothing, from the definition (only for pairs where every n-gram order matches)."""
    logs = []
    for n in range(1, 5):
        h = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
        r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        logs.append(math.log(sum((h & r).values()) / sum(h.values())))
    bp = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return 100 * bp * math.exp(sum(logs) / 4)


@pytest.mark.parametrize(
    ("hyp", "ref"),
    [
        ("a quick brown fox jumps over the lazy dog", "the quick brown fox jumped over a lazy dog today"),
        (
            "这款连衣裙采用优质面料，穿着舒适透气，版型修身显瘦。",
            "这款连衣裙面料柔软舒适，修身的版型显瘦又时尚。",
        ),
        ("The model answers: 42 is the answer.", "The answer is 42, the model says."),
        ("衣服的颜色是红色 red and blue", "衣服是红色和蓝色 red blue"),
    ],
)
def test_rouge_and_bleu_match_an_independent_computation(hyp, ref):
    s = text_scores(hyp, ref)
    cjk = any("\u4e00" <= c <= "\u9fff" for c in hyp + ref)
    h, r = tokenize(hyp, cjk), tokenize(ref, cjk)
    assert s["rouge-1"] == pytest.approx(_ngram_f(h, r, 1), abs=1e-4)
    assert s["rouge-2"] == pytest.approx(_ngram_f(h, r, 2), abs=1e-4)
    assert s["rouge-l"] == pytest.approx(_lcs_f(h, r), abs=1e-4)


@pytest.mark.parametrize(
    ("hyp", "ref"),
    [
        ("the quick brown fox jumps over the lazy dog", "the quick brown fox jumped over the lazy dog again"),
        ("the quick brown fox jumps over the lazy dog today", "the quick brown fox jumped over the lazy dog"),
        ("这款连衣裙采用优质面料，穿着舒适透气。", "这款连衣裙采用优质面料，版型修身显瘦。"),
    ],
)
def test_bleu_matches_the_definition(hyp, ref):
    h, r = tokenize(hyp), tokenize(ref)
    four = {tuple(h[i : i + 4]) for i in range(len(h) - 3)} & {tuple(r[i : i + 4]) for i in range(len(r) - 3)}
    assert four  # every order matches somewhere, so smoothing never applies and the definition is exact
    assert text_scores(hyp, ref)["bleu-4"] == pytest.approx(_bleu(h, r), abs=1e-6)


def test_identical_answers_score_100():
    for text in ("The capital of France is Paris.", "这件衬衫的版型很修身。"):
        assert all(v == pytest.approx(100, abs=1e-4) for v in text_scores(text, text).values())


@pytest.mark.parametrize("empty", ["", "   ", "\n\t", "\u3000"])
def test_empty_prediction_or_reference_scores_zero_without_crashing(empty):
    from rouge_chinese import Rouge

    with pytest.raises(ValueError):  # what crashes the official demo on an empty generation
        Rouge().get_scores(empty or " ", "a b")
    zero = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    assert text_scores(empty, "参考答案") == zero
    assert text_scores("an answer", empty) == zero
    scores = evaluate_predictions(rows([(empty, "a b c d"), ("a b c d", "a b c d")]), ["text"])
    assert scores["rouge-1"] == pytest.approx(50, abs=1e-3) and scores["text_samples"] == 2


# ---------------------------------------------------------------- extraction


def test_parse_json_reads_fences_and_rejects_the_rest():
    assert parse_json('```json\n[{"a": 1}]\n```') == [{"a": 1}]
    assert parse_json('Sure:\n```\n{"a": 1}\n```\nDone.') == {"a": 1}
    assert parse_json('```json\n["x", "y"]') == ["x", "y"]  # a fence cut short by max_new_tokens
    assert parse_json('  ["x"]  ') == ["x"]
    for bad in ('```json\n[{"a": 1}\n```', "[{'a': 1}]", "not json", "", None, "42", '"text"'):
        assert parse_json(bad) is None, bad


TRIPLE = {
    "predicate": "主演",
    "object_type": "人物",
    "subject_type": "影视作品",
    "object": "周星驰",
    "subject": "喜剧之王",
}
OTHER = {
    "predicate": "目",
    "object_type": "目",
    "subject_type": "生物",
    "object": "半翅目",
    "subject": "茶树茶网蝽",
}


def fenced(value) -> str:
    return "```json\n" + json.dumps(value, ensure_ascii=False) + "\n```"


def test_records_precision_recall_f1_by_hand():
    shuffled_keys = dict(reversed(list(TRIPLE.items())))
    data = rows(
        [
            (json.dumps([shuffled_keys]), fenced([TRIPLE])),  # right: key order and fence do not matter
            (fenced([OTHER, TRIPLE]), fenced([OTHER])),  # one right, one extra
            ("[{'subject': broken", fenced([TRIPLE, OTHER])),  # malformed: predicts nothing
            (fenced([OTHER, OTHER]), fenced([OTHER])),  # a duplicate is a second (wrong) prediction
        ]
    )
    s = evaluate_predictions(data)
    assert "rouge-1" not in s  # auto: every reference is JSON → extraction
    assert s["json_parse_rate"] == 75.0
    assert s["exact_match"] == 25.0
    # hits 1 + 1 + 0 + 1 = 3; predicted 1 + 2 + 0 + 2 = 5; reference 1 + 1 + 2 + 1 = 5
    assert s["record_precision"] == pytest.approx(60.0)
    assert s["record_recall"] == pytest.approx(60.0)
    assert s["record_f1"] == pytest.approx(60.0)
    assert s["record_samples"] == 4 and s["extraction_samples"] == 4 and "label_accuracy" not in s


def test_duplicate_references_need_duplicate_predictions():
    s = evaluate_predictions(rows([(json.dumps([OTHER]), json.dumps([OTHER, OTHER]))]))
    assert (s["record_precision"], s["record_recall"], s["exact_match"]) == (100.0, 50.0, 0.0)


def test_records_compared_on_a_subset_of_keys():
    wrong_type = TRIPLE | {"object_type": "地点"}
    data = rows([(json.dumps([wrong_type]), json.dumps([TRIPLE]))])
    assert evaluate_predictions(data)["record_f1"] == 0.0
    keys = ["subject", "predicate", "object"]
    s = evaluate_predictions(data, record_keys=keys)
    assert s["record_f1"] == 100.0 and s["exact_match"] == 100.0


def test_label_lists_accuracy_and_micro_f1_by_hand():
    data = rows(
        [
            ('["水果"]', '["水果"]'),
            ('["平板", "水果"]', '["水果", "平板"]'),  # order does not matter
            ('["平板"]', '["平板", "手机"]'),  # one of two
            ("水果", '["水果"]'),  # not JSON: all wrong
            ('["洗浴", "水果"]', '["洗浴"]'),  # one extra
        ]
    )
    s = evaluate_predictions(data)
    assert s["label_accuracy"] == 40.0 and s["exact_match"] == 40.0
    assert s["json_parse_rate"] == 80.0
    # hits 1 + 2 + 1 + 0 + 1 = 5; predicted 1 + 2 + 1 + 0 + 2 = 6; reference 1 + 2 + 2 + 1 + 1 = 7
    assert s["label_precision"] == pytest.approx(100 * 5 / 6)
    assert s["label_recall"] == pytest.approx(100 * 5 / 7)
    assert s["label_f1"] == pytest.approx(100 * 2 * 5 / 13)


def test_mixed_records_and_labels_are_scored_separately():
    data = rows([(fenced([TRIPLE]), fenced([TRIPLE])), ('["x"]', '["y"]'), ("[]", "[]")])
    s = evaluate_predictions(data)
    assert s["record_samples"] == 2 and s["label_samples"] == 1  # the empty list joins the records
    assert s["record_f1"] == 100.0 and s["label_f1"] == 0.0
    assert s["exact_match"] == pytest.approx(100 * 2 / 3, abs=1e-3)
    # an unparseable answer to an empty list is still wrong
    assert evaluate_predictions(rows([("oops", "[]")]))["exact_match"] == 0.0


# ---------------------------------------------------------------- tool calls


def call(name, **arguments):
    return {"name": name, "arguments": arguments}


def tool_row(prediction_calls, reference_calls, error=None, text=""):
    return {
        "input": "q",
        "prediction": text,
        "reference": "",
        "reference_tool_calls": reference_calls,
        "prediction_tool_calls": prediction_calls,
        "prediction_error": error,
    }


def test_tool_calls_by_hand():
    ref = [call("get_weather", city="Paris", unit="C")]
    data = [
        tool_row([call("get_weather", unit="C", city="Paris")], ref),  # right (argument order is irrelevant)
        tool_row([call("get_weather", city="Berlin", unit="C")], ref),  # right name, wrong arguments
        tool_row([call("search", q="Paris weather")], ref),  # wrong tool
        tool_row([], ref, error="malformed call to get_weather: not a Python call", text="get_weather\n{"),
        tool_row([], ref, text="It is sunny."),  # answered in text instead of calling
        # parallel calls in another order
        tool_row([call("b", x=2), call("a", x=1)], [call("a", x=1), call("b", x=2)]),
    ]
    s = evaluate_predictions(data)
    assert s["tool_samples"] == 6 and "rouge-1" not in s
    assert s["tool_parse_rate"] == pytest.approx(100 * 4 / 6, abs=1e-3)
    assert s["tool_name_accuracy"] == 50.0
    assert s["tool_args_exact_match"] == pytest.approx(100 * 2 / 6, abs=1e-3)


def test_tool_calls_read_back_from_displayed_text():
    assert calls_from_text('get_weather({"city": "Paris"})') == [call("get_weather", city="Paris")]
    assert calls_from_text('{"name": "f", "arguments": {"a": 1}}') == [call("f", a=1)]
    assert calls_from_text("no call here") is None
    data = [
        {
            "prediction": 'get_weather({"city": "Paris"})',
            "reference_tool_calls": [call("get_weather", city="Paris")],
        },
        {"prediction": "Paris is sunny", "reference_tool_calls": [call("get_weather", city="Paris")]},
    ]
    s = evaluate_predictions(data)
    assert (s["tool_parse_rate"], s["tool_name_accuracy"], s["tool_args_exact_match"]) == (50.0, 50.0, 50.0)


def test_tool_and_text_rows_together():
    data = [tool_row([call("f")], [call("f")]), *rows([("Paris is sunny.", "Paris is sunny.")])]
    s = evaluate_predictions(data)
    assert s["tool_samples"] == 1 and s["text_samples"] == 1 and s["samples"] == 2
    assert s["rouge-1"] == pytest.approx(100, abs=1e-4) and s["tool_args_exact_match"] == 100.0


# ---------------------------------------------------------------- choosing families


def test_auto_picks_extraction_at_80_percent_json():
    four_of_five = rows([('["a"]', '["a"]')] * 4 + [("b", "b")])
    three_of_five = rows([('["a"]', '["a"]')] * 3 + [("b", "b")] * 2)
    assert list(choose_families(four_of_five)) == ["extraction"]
    assert list(choose_families(three_of_five)) == ["text"]
    assert list(choose_families(rows([("42", "42")]))) == ["text"]  # bare numbers are not structured answers


def test_named_families_and_errors():
    data = rows([('["a"]', '["a"]')])
    assert {"rouge-1", "label_f1"} <= set(evaluate_predictions(data, "text, extraction"))
    with pytest.raises(ConfigError, match="Did you mean 'text'"):
        evaluate_predictions(data, ["txet"])
    with pytest.raises(ConfigError, match="auto"):
        evaluate_predictions(data, ["auto", "text"])


def test_rows_without_reference_are_not_scored():
    data = [{"input": "q", "prediction": "a"}, *rows([("a b c d", "a b c d")])]
    s = evaluate_predictions(data)
    assert s["samples"] == 1 and s["text_samples"] == 1


# ---------------------------------------------------------------- the tutorial's real data


@pytest.fixture(scope="module")
def mixed_targets() -> list[str]:
    if not MIXED.is_file():
        pytest.skip(f"{MIXED} is absent (../shared is not beside the project)")
    return [json.loads(line)["target"] for line in MIXED.read_text(encoding="utf-8").splitlines()]


def test_real_references_against_themselves_score_100(mixed_targets):
    data = rows(zip(mixed_targets, mixed_targets, strict=True))
    s = evaluate_predictions(data)
    assert s["record_samples"] == 500 and s["label_samples"] == 402
    scores = {k: v for k, v in s.items() if not is_count(k)}
    assert set(scores) >= {"json_parse_rate", "exact_match", "record_f1", "label_accuracy", "label_f1"}
    assert all(v == 100.0 for v in scores.values()), scores
    text = evaluate_predictions(data[:50] + data[-50:], ["text"])
    assert all(v == pytest.approx(100, abs=1e-3) for k, v in text.items() if not is_count(k)), text


def test_real_references_against_shuffled_references_score_lower(mixed_targets):
    shuffled = mixed_targets[:]
    random.Random(0).shuffle(shuffled)
    s = evaluate_predictions(rows(zip(shuffled, mixed_targets, strict=True)))
    assert s["json_parse_rate"] == 100.0  # still well-formed JSON, just the wrong answers
    assert s["record_f1"] < 10 and s["exact_match"] < 40
    assert 0 <= s["label_f1"] < 60
    text = evaluate_predictions(rows(zip(shuffled[:100], mixed_targets[:100], strict=True)), ["text"])
    assert 0 < text["rouge-l"] < 90 and 0 < text["bleu-4"] < 90
