"""Loading models and adapters runs no code from the files: remote code only when asked (and said so),
pickled `.bin` weights only through `torch.load(weights_only=True)`."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from chattune.config import TrainConfig
from chattune.errors import ModelLoadError
from chattune.infer.engine import load_engine
from chattune.models.load import load_model, load_tokenizer


class Payload:
    """Unpickling this runs `exec`, which writes the marker file: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def hostile_bin(path: Path, marker: Path, keys: list[str]) -> Path:
    """A `.bin` checkpoint whose tensors are payloads; proves the payload is live with an unsafe load."""
    torch.save({k: Payload(marker) for k in keys}, path)
    torch.load(path, weights_only=False)  # the unsafe way: the payload runs...
    assert marker.read_text() == "pwned"
    marker.unlink()  # ...so its absence later means our loaders did not run it
    return path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def remote_code_dir(tiny_model_dir: Path, tmp_path: Path, model_type: str) -> tuple[Path, Path]:
    """The tiny model plus a modeling file that `auto_map` points to; importing it writes a marker."""
    model_dir = copy_model(tiny_model_dir, tmp_path / f"remote-{model_type}")
    marker = tmp_path / f"remote-code-ran-{model_type}"
    (model_dir / "evil_model.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"class EvilConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "evil_model.EvilConfig",
        "AutoModelForCausalLM": "evil_model.EvilForCausalLM",
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir, marker


# ---------------------------------------------------------------- trust_remote_code


def test_trust_remote_code_defaults_off():
    assert TrainConfig.model_fields["trust_remote_code"].default is False
    for fn in (load_model, load_tokenizer, load_engine):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__name__


def test_remote_code_does_not_run_unless_asked(tiny_model_dir, tmp_path, caplog):
    # a known model_type: transformers' own class is used and the shipped file is never imported
    known, marker = remote_code_dir(tiny_model_dir, tmp_path, "llama")
    with caplog.at_level(logging.WARNING, logger="chattune"):
        net = load_model(str(known))
        load_tokenizer(str(known))
    assert type(net).__name__ == "LlamaForCausalLM" and not marker.exists()
    assert "trust_remote_code" not in caplog.text
    # an unknown model_type: nothing can load it without the shipped code, so loading stops, clearly
    unknown, marker = remote_code_dir(tiny_model_dir, tmp_path, "evilnet")
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(str(unknown))
    assert not marker.exists()


def test_remote_code_when_asked_is_logged(tiny_model_dir, tmp_path, caplog):
    model_dir, marker = remote_code_dir(tiny_model_dir, tmp_path, "evilnet")
    with caplog.at_level(logging.WARNING, logger="chattune"):
        load_tokenizer(str(model_dir), trust_remote_code=True)
        net = load_model(str(model_dir), trust_remote_code=True)
    assert type(net).__name__ == "EvilForCausalLM" and marker.read_text() == "ran"  # the flag really matters
    said = [r.getMessage() for r in caplog.records if "trust_remote_code is on" in r.getMessage()]
    assert len(said) == 2 and all(str(model_dir) in m for m in said), caplog.text
    assert {r.levelname for r in caplog.records if "trust_remote_code" in r.getMessage()} == {"WARNING"}


# ---------------------------------------------------------------- pickled weights


def test_hostile_bin_model_weights_do_not_run(tiny_model_dir, tmp_path):
    model_dir = copy_model(tiny_model_dir, tmp_path / "bin-model")
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "pickle-ran"
    keys = list(load_model(str(tiny_model_dir)).state_dict())
    hostile_bin(model_dir / "pytorch_model.bin", marker, keys)
    with pytest.raises(ModelLoadError, match=r"Weights only load failed|weights_only"):
        load_model(str(model_dir))
    with pytest.raises(ModelLoadError):
        load_engine(str(model_dir))
    assert not marker.exists()


def test_plain_bin_model_weights_still_load(tiny_model_dir, tmp_path):
    model_dir = copy_model(tiny_model_dir, tmp_path / "plain-bin")
    (model_dir / "model.safetensors").unlink()
    reference = load_model(str(tiny_model_dir)).state_dict()
    torch.save(reference, model_dir / "pytorch_model.bin")
    loaded = load_model(str(model_dir)).state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


@pytest.fixture()
def bin_adapter(tiny_model_dir, tmp_path) -> Path:
    """A real LoRA adapter for the tiny model, saved as adapter_model.bin (pickle) instead of safetensors."""
    from peft import LoraConfig, get_peft_model

    net = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=2, target_modules=["q_proj"]))
    out = tmp_path / "bin-adapter"
    net.save_pretrained(out, safe_serialization=False)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(out)  # as training leaves it beside the adapter
    assert (out / "adapter_model.bin").is_file() and not (out / "adapter_model.safetensors").exists()
    return out


def test_hostile_bin_adapter_does_not_run(tiny_model_dir, bin_adapter, tmp_path):
    load_engine(str(tiny_model_dir), adapter=bin_adapter)  # the genuine .bin adapter loads
    keys = list(torch.load(bin_adapter / "adapter_model.bin", weights_only=True))
    marker = tmp_path / "adapter-pickle-ran"
    hostile_bin(bin_adapter / "adapter_model.bin", marker, keys)
    with pytest.raises(ModelLoadError, match="could not load the adapter"):
        load_engine(str(tiny_model_dir), adapter=bin_adapter)
    assert not marker.exists()
