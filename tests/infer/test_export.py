"""`chattune export`: a merged LoRA reloads with plain transformers and generates as base + adapter."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from chattune.config import build_config
from chattune.errors import ChattuneError, ConfigError
from chattune.infer.export import export_merged
from chattune.train.run import run_training


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def train(model_dir: Path, root: Path, name: str, **kw) -> Path:
    """A short run on a few conversations; returns its final/."""
    data = root / "conv.jsonl"
    if not data.is_file():
        rows = [[{"role": "user", "content": f"What is {i} plus one?"},
                 {"role": "assistant", "content": f"The answer is {i + 1}."}] for i in range(8)]  # fmt: skip
        data.write_text("".join(json.dumps({"conversations": r}) + "\n" for r in rows))
    # one thread: tests share the machine, and a tiny model gains nothing from more
    values = dict(model=str(model_dir), train_file=str(data), output_dir=str(root / name), batch_size=4,
                  grad_accum=1, learning_rate=1e-2, max_steps=10, logging_steps=5, save_steps=100, seed=1,
                  num_threads=1)  # fmt: skip
    return run_training(build_config(values | kw), console=quiet())


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A trained LoRA adapter, and an untrained P-Tuning v2 one (only its kind matters), on the tiny model."""
    from transformers import AutoModelForCausalLM

    from chattune.models.methods import apply_method

    root = tmp_path_factory.mktemp("export-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATTUNE_HOME", str(root / "home"))  # keep the data cache out of ~/.cache
        lora = train(tiny_model_dir, root, "lora")
    ptuning = root / "pt" / "final"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_method(base, build_config({"method": "ptuning_v2", "pre_seq_len": 4})).save_pretrained(ptuning)
    return {"lora": lora, "ptuning": ptuning}


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory) -> Path:
    return export_merged(None, runs["lora"], tmp_path_factory.mktemp("exported") / "merged", console=quiet())


def test_merged_model_matches_base_plus_adapter(tiny_model_dir, runs, merged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    assert (
        tok.chat_template and tok.chat_template == AutoTokenizer.from_pretrained(runs["lora"]).chat_template
    )
    messages = [{"role": "user", "content": "What is 3 plus one?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]

    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    tuned = PeftModel.from_pretrained(base, runs["lora"]).eval()
    with torch.no_grad():
        want, got = tuned(ids).logits, plain(ids).logits
    assert not torch.allclose(
        want, base_logits, atol=1e-3
    )  # the adapter matters, so the check below means something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert plain.generation_config.eos_token_id in (im_end, [im_end])
    kw = {"max_new_tokens": 20, "do_sample": False, "eos_token_id": im_end, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        assert plain.generate(ids, **kw).tolist() == tuned.generate(input_ids=ids, **kw).tolist()


def test_export_dir_is_self_describing_safetensors(runs, merged):
    names = {p.name for p in merged.iterdir()}
    assert "config.json" in names and "generation_config.json" in names and "tokenizer_config.json" in names
    assert any(n.endswith(".safetensors") for n in names)
    assert not any(n.endswith(".bin") for n in names) and "adapter_config.json" not in names
    info = json.loads((merged / "chattune.json").read_text())
    assert info["template"] == "hf" and info["merged_from"]["adapter"] == str(runs["lora"].resolve())
    assert not list(merged.parent.glob(".*tmp*"))  # the staging dir was renamed into place


def test_chattune_loads_the_export_as_a_full_model(merged):
    from chattune.infer.engine import load_engine

    engine = load_engine(None, merged)
    assert not engine.has_adapter and engine.template.name == "hf"


def test_ptuning_adapter_cannot_be_merged(runs, tmp_path):
    with pytest.raises(ChattuneError, match="virtual key/value tokens") as err:
        export_merged(None, runs["ptuning"], tmp_path / "out", console=quiet())
    assert "chattune serve --model" in str(err.value) and "--adapter" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_full_model_dir_is_already_standalone(tiny_model_dir, tmp_path):
    with pytest.raises(ChattuneError, match="already a standalone model"):
        export_merged(None, tiny_model_dir, tmp_path / "out", console=quiet())


def test_non_empty_output_is_kept_unless_overwrite(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_merged(None, runs["lora"], out, console=quiet())
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="merged from"):
        export_merged(None, runs["lora"], runs["lora"], console=quiet(), overwrite=True)
    export_merged(None, runs["lora"], out, console=quiet(), overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
