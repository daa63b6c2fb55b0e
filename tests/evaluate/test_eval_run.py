"""`chattune eval` end to end on the tiny random model: files, keys, ranges, base comparison, config runs."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from chattune.config import build_config
from chattune.data.schema import Conversation, Message, Pair, ToolCall
from chattune.errors import ConfigError
from chattune.evaluate.generation import compute_generation_metrics, eval_items
from chattune.evaluate.metrics import is_count
from chattune.evaluate.run import (
    BASE_PREDICTIONS_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    eval_from_config,
    run_eval,
    score_file,
)
from chattune.infer.engine import load_engine
from chattune.infer.generate import Sampling

SAMPLING = Sampling(max_new_tokens=6)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """A hidden-64 model gains nothing from threads, and on a busy machine their spinning costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=140)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture()
def qa_file(tmp_path) -> Path:
    return write_jsonl(
        tmp_path / "qa.jsonl",
        [{"prompt": f"What is {i} plus one?", "response": f"The answer is {i + 1}."} for i in range(4)],
    )


@pytest.fixture()
def json_file(tmp_path) -> Path:
    return write_jsonl(
        tmp_path / "labels.jsonl",
        [{"context": f"Input: item {i}\nAnswer: ", "target": json.dumps([f"label{i}"])} for i in range(4)],
    )


@pytest.fixture()
def tool_file(tmp_path) -> Path:
    tools = [{"name": "get_weather", "description": "weather", "parameters": {"type": "object"}}]
    conv = {
        "tools": tools,
        "conversations": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "tool",
                "name": "get_weather",
                "parameters": {"city": "Paris"},
                "observation": {"t": 21},
            },
            {"role": "assistant", "content": "It is 21 degrees in Paris."},
        ],
    }
    return write_jsonl(tmp_path / "tools.jsonl", [conv, conv])


def _save_run_info(path: Path, base: Path) -> None:
    (path / "chattune.json").write_text(json.dumps({"base_model": str(base), "template": "hf"}))


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) weights, saved like a run's final/."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    path = tmp_path_factory.mktemp("lora")
    get_peft_model(base, cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    _save_run_info(path, tiny_model_dir)
    return path


@pytest.fixture(scope="module")
def full_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A full fine-tune's output: the whole model, perturbed, in its own dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("full")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    _save_run_info(path, tiny_model_dir)
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def check_scores(scores: dict) -> None:
    for k, v in scores.items():
        assert isinstance(v, int | float), k
        assert v >= 0 if is_count(k) else 0 <= v <= 100, (k, v)


def predict_directly(model_dir, data_file) -> list[str]:
    """The base model's predictions, loaded on its own, to compare the eval's base run with."""
    from chattune.evaluate.generation import generate_rows, items_from_file

    engine = load_engine(str(model_dir), template="hf")
    return [r["prediction"] for r in generate_rows(engine, items_from_file(data_file), SAMPLING)]


# ---------------------------------------------------------------- prompts


def test_every_trained_assistant_turn_is_a_scored_prompt():
    call = ToolCall("get_weather", {"city": "Paris"})
    conv = Conversation(
        [
            Message("system", "You are helpful."),
            Message("user", "Weather in Paris and Rome?"),
            Message("assistant", "", tool_call=call),
            Message("assistant", "", tool_call=ToolCall("get_weather", {"city": "Rome"})),
            Message("observation", "21 and 25"),
            Message("assistant", "21 and 25 degrees."),
            Message("user", "Thanks"),
            Message("assistant", "Welcome", loss=False),
        ]
    )
    items = eval_items(conv)
    assert len(items) == 2
    parallel, answer = items
    assert [c.name for c in parallel.reference_calls] == ["get_weather", "get_weather"]
    assert [m.role for m in parallel.prompt.sample.messages] == ["system", "user"]
    assert 'get_weather({"city": "Rome"})' in parallel.prompt.reference
    assert answer.reference_calls is None and answer.prompt.reference == "21 and 25 degrees."
    assert len(answer.prompt.sample.messages) == 5
    assert eval_items(conv, turns="last") == [answer]
    pair = eval_items(Pair("Q", "A"))
    assert [(i.prompt.reference, i.reference_calls) for i in pair] == [("A", None)]
    with pytest.raises(ConfigError, match="turns"):
        eval_items(conv, turns="first")


# ---------------------------------------------------------------- the command


def test_eval_with_lora_adapter_and_base_comparison(tiny_model_dir, lora_dir, qa_file, tmp_path):
    out = tmp_path / "eval"
    console = quiet()
    result = run_eval(
        model=None, adapter=lora_dir, data_file=qa_file, output_dir=out, sampling=SAMPLING,
        batch_size=4, compare_base=True, console=console,
    )  # fmt: skip
    assert {p.name for p in out.iterdir()} == {PREDICTIONS_FILE, BASE_PREDICTIONS_FILE, METRICS_FILE}
    saved = json.loads((out / METRICS_FILE).read_text())
    assert saved == result and set(saved) == {"tuned", "base", "run"}
    for scores in (saved["tuned"], saved["base"]):
        assert {"rouge-1", "rouge-2", "rouge-l", "bleu-4"} <= set(scores) and scores["samples"] == 4
        check_scores(scores)
    tuned, base = lines(out / PREDICTIONS_FILE), lines(out / BASE_PREDICTIONS_FILE)
    assert [list(r) for r in tuned] == [["input", "reference", "prediction"]] * 4
    assert tuned[0]["input"] == "What is 0 plus one?" and tuned[0]["reference"] == "The answer is 1."
    # the adapter switched off in place answers exactly as the base model loaded on its own
    assert [r["prediction"] for r in base] == predict_directly(tiny_model_dir, qa_file)
    assert [r["prediction"] for r in tuned] != [r["prediction"] for r in base]
    text = console.file.getvalue()
    assert "base" in text and "tuned" in text and "Δ" in text and "rouge-1" in text


def test_eval_of_a_full_model_reloads_the_base(tiny_model_dir, full_dir, json_file, tmp_path):
    out = tmp_path / "eval"
    result = run_eval(
        model=str(tiny_model_dir), adapter=full_dir, data_file=json_file, output_dir=out,
        sampling=SAMPLING, compare_base=True, limit=3, console=quiet(),
    )  # fmt: skip
    assert {"json_parse_rate", "exact_match", "label_f1"} <= set(result["tuned"])  # auto: JSON references
    assert result["tuned"]["samples"] == 3 and result["run"]["predictions"] == 3
    check_scores(result["tuned"])
    check_scores(result["base"])
    base = [r["prediction"] for r in lines(out / BASE_PREDICTIONS_FILE)]
    assert base == predict_directly(tiny_model_dir, json_file)[:3]


def test_eval_of_tool_conversations_scores_calls_and_answers(tiny_model_dir, lora_dir, tool_file, tmp_path):
    out = tmp_path / "eval"
    result = run_eval(
        model=None, adapter=lora_dir, data_file=tool_file, output_dir=out, sampling=SAMPLING, console=quiet()
    )
    scores = result["tuned"]
    assert scores["tool_samples"] == 2 and scores["text_samples"] == 2 and scores["samples"] == 4
    assert {"tool_parse_rate", "tool_name_accuracy", "tool_args_exact_match", "rouge-l"} <= set(scores)
    check_scores(scores)
    rows = lines(out / PREDICTIONS_FILE)
    assert rows[0]["reference_tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert rows[0]["reference"] == 'get_weather({"city": "Paris"})'
    assert "reference_tool_calls" not in rows[1] and rows[1]["reference"] == "It is 21 degrees in Paris."
    assert score_file(out / PREDICTIONS_FILE)["tool_samples"] == 2  # the file scores again without a model


def test_eval_from_config_uses_the_runs_final_and_test_file(tiny_model_dir, lora_dir, qa_file, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_dir, run / "final")
    cfg = build_config({"model": str(tiny_model_dir), "test_file": str(qa_file), "output_dir": str(run),
                        "max_target_len": 4})  # fmt: skip
    result = eval_from_config(cfg, metrics=["text"], limit=2, console=quiet())
    assert (run / "eval" / METRICS_FILE).is_file() and len(lines(run / "eval" / PREDICTIONS_FILE)) == 2
    assert result["run"]["sampling"]["max_new_tokens"] == 4 and result["run"]["adapter"] == str(run / "final")
    assert set(result) == {"tuned", "run"}
    check_scores(result["tuned"])
    with pytest.raises(ConfigError, match="train first"):
        eval_from_config(cfg.model_copy(update={"output_dir": str(tmp_path / "none")}), console=quiet())
    with pytest.raises(ConfigError, match="test_file or eval_file"):
        eval_from_config(cfg.model_copy(update={"test_file": None}), console=quiet())


def test_eval_refuses_what_it_cannot_do(tiny_model_dir, qa_file, tmp_path):
    kw = {
        "model": str(tiny_model_dir),
        "output_dir": tmp_path / "e",
        "sampling": SAMPLING,
        "console": quiet(),
    }
    with pytest.raises(ConfigError, match="--adapter"):
        run_eval(adapter=None, data_file=qa_file, compare_base=True, **kw)
    with pytest.raises(ConfigError, match="Did you mean"):
        run_eval(adapter=None, data_file=qa_file, metrics=["txet"], **kw)
    no_answers = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hi", "response": ""}])
    with pytest.raises(ConfigError, match="no reference answers"):
        run_eval(adapter=None, data_file=no_answers, **kw)
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------- for the Trainer


def test_generation_metrics_on_an_in_memory_model_restore_its_state(tiny_model_dir, chatml_tokenizer):
    from transformers import AutoModelForCausalLM

    from chattune.data.templates import build_template
    from chattune.infer.engine import Engine

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.train()
    model.config.use_cache = False
    engine = Engine(model, chatml_tokenizer, build_template("hf", chatml_tokenizer), "training", False)
    samples = [
        Conversation(
            [Message("user", f"What is {i} plus one?"), Message("assistant", f"The answer is {i + 1}.")]
        )
        for i in range(6)
    ]
    scores = compute_generation_metrics(engine, samples, sampling=SAMPLING, limit=4, batch_size=4)
    assert scores["text_samples"] == 4 and {"rouge-1", "bleu-4"} <= set(scores)
    check_scores(scores)
    assert model.training and model.config.use_cache is False
    assert compute_generation_metrics(engine, [Pair("Hi", "")]) == {}  # nothing to score against
