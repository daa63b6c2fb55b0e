"""`chattune export --format gguf|ollama`: weights, tokenizer and chat template arrive in the GGUF unchanged.

Llama/Qwen exports load back into transformers (`gguf_file=`) and must give the merged model's logits; the
ChatGLM3 export (which transformers cannot load) is read back tensor by tensor with gguf's reader. Chat
templates (the GGUF's Jinja one and the Modelfile's Go one) must render the training encoding's token ids.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from chattune.config import build_config
from chattune.data.schema import Conversation, Message
from chattune.errors import ChattuneError, ConfigError
from chattune.infer import gguf_export, ollama
from chattune.infer.export import export_gguf
from chattune.models.load import load_tokenizer
from chattune.train.run import run_training

TOOLS = [{"name": "get_weather", "description": "Weather of a city", "parameters": {"city": "string"}}]
# Conversations every template check renders: a plain turn, a system prompt with two turns, and (where the
# family has them) tool definitions and a tool result.
CONVERSATIONS = [
    [("user", "Hello! How can I help you today?"), ("assistant", "The capital of France is Paris.")],
    [
        ("system", "You are a helpful assistant. Answer briefly."),
        ("user", "What is the weather in Berlin?"),
        ("assistant", "It is sunny and 21 degrees."),
        ("user", "one two three"),
        ("assistant", "four five six"),
    ],
]
TOOL_CONVERSATION = [
    ("user", "What is the weather in Paris?"),
    ("assistant", "Let me check."),
    ("observation", '{"temperature": 21, "sky": "sunny"}'),
    ("assistant", "It is sunny and 21 degrees in Paris."),
]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def train(model_dir: Path, root: Path, rows: list[list[dict]]) -> Path:
    """A short LoRA run (one thread: tests share the machine); returns its final/."""
    data = root / "conv.jsonl"
    data.write_text("".join(json.dumps({"conversations": r}) + "\n" for r in rows))
    values = dict(model=str(model_dir), train_file=str(data), output_dir=str(root / "run"), batch_size=4,
                  grad_accum=1, learning_rate=1e-2, max_steps=6, logging_steps=5, save_steps=100, seed=1,
                  num_threads=1, lora_target="all-linear")  # fmt: skip
    return run_training(build_config(values), console=quiet())


def sums(n: int = 8) -> list[list[dict]]:
    return [[{"role": "user", "content": f"What is {i} plus one?"},
             {"role": "assistant", "content": f"The answer is {i + 1}."}] for i in range(n)]  # fmt: skip


def merged_reference(base_dir: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


@pytest.fixture(scope="module")
def llama_lora(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf-llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATTUNE_HOME", str(root / "home"))
        return train(tiny_model_dir, root, sums())


@pytest.fixture(scope="module")
def llama_merged(tiny_model_dir, llama_lora):
    return merged_reference(tiny_model_dir, llama_lora)


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()


# Max |logit difference| of the GGUF loaded back against the merged fp32 model (logits' std 0.17; the
# adapter moves them by up to 0.93): f32 is the same numbers (measured 0); f16/bf16 round each weight to
# 11/8 significant bits (measured 2.6e-4 / 2.1e-3); q8_0 stores 8-bit blocks of 32 with an f16 scale
# (measured 7.4e-3). A wrong layout (q/k not permuted, a dropped bias) is off by far more than these bounds.
BOUNDS = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2}


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_llama_lora_gguf_loads_back_with_the_merged_logits(
    tiny_model_dir, llama_lora, llama_merged, chatml_tokenizer, kind, tmp_path
):
    from transformers import AutoModelForCausalLM

    gguf = export_gguf(None, llama_lora, tmp_path / "out", console=quiet(), gguf_type=kind)
    assert gguf.name == f"model-{kind}.gguf" and not list(tmp_path.glob(".*"))
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = chatml_tokenizer("Hello! What is the weather in Berlin? one two three")["input_ids"]
    want, got = logits_of(llama_merged, ids), logits_of(loaded.eval(), ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert (logits_of(base, ids) - want).abs().max() > 0.05  # the adapter matters: a lost merge would show
    diff = (got - want).abs().max().item()
    assert diff <= BOUNDS[kind], diff


def test_gguf_tokenizer_and_metadata_are_the_runs(llama_lora, chatml_tokenizer, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    path = export_gguf(None, llama_lora, tmp_path / "out", console=quiet(), gguf_type="q8_0")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "<|im_start|>user\nWhat is the weather in Berlin? 21 degrees<|im_end|>\n<|im_start|>assistant\n"
    assert tok(text)["input_ids"] == chatml_tokenizer(text)["input_ids"]
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["tokenizer.chat_template"] == AutoTokenizer.from_pretrained(llama_lora).chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["general.architecture"] == "llama"
    # norms stay f32; matrices are q8_0 (hidden 64 and 128 split into blocks of 32)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "Q8_0"


def save_tiny(kind: str, path: Path, tokenizer) -> Path:
    """A tiny Qwen2 (q/k/v biases), Qwen3 (q/k norms) or Mistral, saved with `tokenizer` as a plain dir."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        kind, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        # transformers' GGUF loader reads no head dim for qwen3 and takes Qwen3's own 128 (which also makes
        # the export write key_length, as head_dim differs from hidden / heads)
        head_dim=128 if kind == "qwen3" else 16,
        tie_word_embeddings=kind == "qwen3", eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)  # a dropped one would show
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_full_model_dirs_export_as_they_are(kind, chatml_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny(kind, tmp_path / kind, chatml_tokenizer)
    path = export_gguf(None, model_dir, tmp_path / "out", console=quiet(), gguf_type="f32")
    info = json.loads((path.parent / "chattune.json").read_text())
    assert info["exported_from"]["model"] == str(model_dir.resolve())
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = chatml_tokenizer("one two three four five six seven")["input_ids"]
    want = logits_of(AutoModelForCausalLM.from_pretrained(model_dir).eval(), ids)
    torch.testing.assert_close(logits_of(loaded.eval(), ids), want, atol=1e-5, rtol=0)


def test_unsupported_architecture_is_refused_before_any_work(tmp_path):
    model_dir = tmp_path / "gpt2"
    model_dir.mkdir()  # a config alone: the refusal must come before loading any weights
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel") as err:
        export_gguf(None, model_dir, tmp_path / "out", console=quiet())
    assert "ChatGLM3" in str(err.value) and "Qwen2" in str(err.value) and "LlamaForCausalLM" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_ptuning_cannot_become_a_gguf(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from chattune.models.methods import apply_method

    adapter = tmp_path / "pt"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_method(base, build_config({"method": "ptuning_v2", "pre_seq_len": 4})).save_pretrained(adapter)
    with pytest.raises(ChattuneError, match="virtual key/value tokens"):
        export_gguf(str(tiny_model_dir), adapter, tmp_path / "out", console=quiet(), fmt="ollama")
    assert not (tmp_path / "out").exists()


def test_interrupted_export_leaves_nothing_half_written(llama_lora, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    real, calls = gguf_export.quantize_tensor, []

    def failing(tensor, kind):
        calls.append(kind)
        if len(calls) == 5:  # mid-way through the tensor data: header and 4 tensors are on disk
            raise KeyboardInterrupt
        return real(tensor, kind)

    monkeypatch.setattr(gguf_export, "quantize_tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(None, llama_lora, out, console=quiet(), fmt="ollama", overwrite=True)
    assert len(calls) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in out.iterdir()] == [
        "notes.txt"
    ]


def test_cli_writes_gguf_and_modelfile(run_cli, llama_lora, tmp_path):
    done = run_cli("export", "--adapter", str(llama_lora), "--format", "ollama", "-o", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "Modelfile",
        "chattune.json",
        "model-f32.gguf",
    ]
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert (
        modelfile.startswith("FROM ./model-f32.gguf\nTEMPLATE") and 'PARAMETER stop "<|im_end|>"' in modelfile
    )
    bad = run_cli("export", "--adapter", str(llama_lora), "--format", "onnx", "-o", "x", cwd=tmp_path)
    assert bad.returncode != 0 and "hf, gguf, ollama" in bad.stderr


# ---- ChatGLM3: tensors read back with gguf's reader; the embedded Jinja template against training ------


def glm_ids(tok, text: str) -> list[int]:
    """Ids as llama.cpp reads a rendered ChatGLM3 prompt: special-token names become their ids, the text
    between them goes through SentencePiece (with its dummy prefix, as after every special token)."""
    import re

    names = "|".join(re.escape(t) for t in tok.SPECIAL_TOKENS)
    ids: list[int] = []
    for piece in re.split(f"({names})", text):
        if piece in tok.SPECIAL_TOKENS:
            ids.append(tok.get_command(piece))
        elif piece:
            ids += tok.tokenizer.encode(piece)
    return ids


@pytest.fixture(scope="module")
def glm_run(chatglm3_tokenizer_model, tmp_path_factory) -> tuple[Path, Path]:
    """(converted tiny ChatGLM3 with the real tokenizer, a LoRA run on it)."""
    from tests.models.test_chatglm3_convert import chatglm3_config, chatglm3_weights, write_checkpoint

    from chattune.models.chatglm3_convert import convert_chatglm3

    root = tmp_path_factory.mktemp("gguf-glm")
    cfg = chatglm3_config(padded_vocab_size=65024)  # ChatGLM3's padded embedding: 226 unused rows
    weights = chatglm3_weights(cfg)
    torch.manual_seed(0)
    for key in ("transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight"):
        weights[key] = torch.randn(65024, weights[key].shape[1]) * 0.2  # the helper sizes its tiny vocab
    sp = chatglm3_tokenizer_model.read_bytes()
    src = write_checkpoint(root / "src", cfg, weights, sp, "safetensors")
    glm = convert_chatglm3(src, root / "glm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATTUNE_HOME", str(root / "home"))
        return glm, train(glm, root, sums())


def test_chatglm3_gguf_holds_every_merged_tensor(glm_run, tmp_path):
    import gguf

    glm, lora = glm_run
    path = export_gguf(None, lora, tmp_path / "out", console=quiet(), gguf_type="f32")
    merged = merged_reference(glm, lora).state_dict()
    reader = gguf.GGUFReader(path)
    got = {
        t.name: torch.from_numpy(np.array(t.data)).reshape(tuple(reversed(t.shape.tolist())))
        for t in reader.tensors
    }
    want = {"token_embd.weight": merged["model.embed_tokens.weight"], "output_norm.weight": merged["model.norm.weight"],
            "output.weight": merged["lm_head.weight"]}  # fmt: skip
    for i in range(2):
        layer = f"model.layers.{i}."
        for kind in ("weight", "bias"):  # documented reshape: q, k, v fused as [q | k | v]
            qkv = [merged[f"{layer}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            want[f"blk.{i}.attn_qkv.{kind}"] = torch.cat(qkv)
        want |= {
            f"blk.{i}.attn_output.weight": merged[f"{layer}self_attn.o_proj.weight"],
            f"blk.{i}.ffn_up.weight": merged[f"{layer}mlp.gate_up_proj.weight"],  # already [gate | up]
            f"blk.{i}.ffn_down.weight": merged[f"{layer}mlp.down_proj.weight"],
            f"blk.{i}.attn_norm.weight": merged[f"{layer}input_layernorm.weight"],
            f"blk.{i}.ffn_norm.weight": merged[f"{layer}post_attention_layernorm.weight"],
        }
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=0, rtol=0, msg=name)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "chatglm" and fields["chatglm.rope.dimension_count"] == 8
    assert fields["chatglm.attention.head_count_kv"] == 2 and fields["tokenizer.ggml.pre"] == "chatglm-spm"
    assert (
        len(fields["tokenizer.ggml.tokens"]) == 65024 and fields["tokenizer.ggml.tokens"][64790] == "[gMASK]"
    )
    assert fields["tokenizer.ggml.tokens"][65000] == "[PAD65000]"
    # stops: eos, then <|user|> (end of turn) and <|observation|> (a tool call waits for its result)
    ids = (
        fields["tokenizer.ggml.eos_token_id"],
        fields["tokenizer.ggml.eot_token_id"],
        fields["tokenizer.ggml.eom_token_id"],
    )
    assert ids == (2, 64795, 64797) and fields["tokenizer.ggml.add_bos_token"] is False


def test_chatglm3_q8_0_tensors_within_the_block_bound(glm_run, tmp_path):
    import gguf
    from gguf.quants import dequantize

    glm, lora = glm_run
    path = export_gguf(None, lora, tmp_path / "out", console=quiet(), gguf_type="q8_0")
    merged = merged_reference(glm, lora).state_dict()
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_down.weight")
    assert tensor.tensor_type.name == "Q8_0"
    got = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type)).reshape(64, 96)
    want = merged["model.layers.1.mlp.down_proj.weight"]
    # q8_0: blocks of 32 on a grid of step max|x| / 127, the step stored in f16: an element moves by at most
    # half a step, plus 127 steps times the step's f16 rounding (2^-11 relative)
    step = want.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
    error = (got - want).reshape(-1, 32).abs()
    assert (error <= step * (0.5 + 127 * 2**-11)).all() and error.max() > 0  # lossy, within the bound


def conversation(turns, tools=None) -> Conversation:
    return Conversation([Message(r, c) for r, c in turns], tools=tools)


def as_dicts(turns) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


@pytest.mark.parametrize(
    "turns", [*CONVERSATIONS, TOOL_CONVERSATION], ids=["one-turn", "system-multi", "tools"]
)
def test_chatglm3_gguf_template_renders_the_training_ids(glm_run, turns, tmp_path):
    import gguf

    from chattune.data.templates import build_template

    glm, lora = glm_run
    path = export_gguf(None, lora, tmp_path / "out", console=quiet(), gguf_type="q8_0")
    jinja = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
    tok = load_tokenizer(str(glm), str(lora), False)
    template = build_template("chatglm3", tok)
    tools = TOOLS if turns is TOOL_CONVERSATION else None
    want = template.encode(conversation(turns, tools))[0].input_ids
    text = tok.apply_chat_template(as_dicts(turns), chat_template=jinja, tools=tools, tokenize=False)
    assert [*glm_ids(tok, text), tok.eos_token_id] == want
    for i, (role, _) in enumerate(turns):
        if role == "assistant":
            prompt = tok.apply_chat_template(
                as_dicts(turns[:i]),
                chat_template=jinja,
                tools=tools,
                tokenize=False,
                add_generation_prompt=True,
            )
            assert glm_ids(tok, prompt) == template.encode_prompt(conversation(turns[:i], tools))


# ---- Ollama: the Modelfile's TEMPLATE, rendered by our renderer of its subset, against training -------


def modelfile_parts(path: Path) -> tuple[str | None, str | None, list[str]]:
    """(TEMPLATE, SYSTEM, stops) of a Modelfile we wrote."""
    import re

    text = path.read_text()
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    return template and template[1], system and system[1], stops


def check_modelfile_parity(template, system, stops, tok, training, ids_of, conversations) -> None:
    """Each prompt Ollama builds is the training prompt token for token; each reply written after it, plus
    the stop token the model emits, is the training sequence through that reply."""
    stop_ids = [tok.convert_tokens_to_ids(s) for s in stops]
    for turns in conversations:
        want = training.encode(conversation(turns))[0].input_ids
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            prompt = ollama.render(template, ollama.ollama_messages(as_dicts(turns[:i])), system)
            assert ids_of(prompt) == training.encode_prompt(conversation(turns[:i]))
            reply = ids_of(ollama.render(template, ollama.ollama_messages(as_dicts(turns[: i + 1])), system))
            assert want[: len(reply)] == reply and want[len(reply)] in stop_ids


def test_chatml_modelfile_parity(llama_lora, chatml_tokenizer, tmp_path):
    from chattune.data.templates import build_template

    export_gguf(None, llama_lora, tmp_path / "out", console=quiet(), fmt="ollama", gguf_type="q8_0")
    template, system, stops = modelfile_parts(tmp_path / "out" / "Modelfile")
    assert template == ollama.TEMPLATES["chatml"] and system == "You are helpful." and stops == ["<|im_end|>"]
    training = build_template("hf", chatml_tokenizer)
    ids_of = lambda text: chatml_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    check_modelfile_parity(template, system, stops, chatml_tokenizer, training, ids_of, CONVERSATIONS)


def test_llama3_modelfile_parity(llama3_tokenizer, tmp_path):
    from tests.conftest import save_tiny_llama

    from chattune.data.templates import build_template

    model_dir = save_tiny_llama(tmp_path / "llama3", llama3_tokenizer)
    export_gguf(None, model_dir, tmp_path / "out", console=quiet(), fmt="ollama", gguf_type="q8_0")
    template, system, stops = modelfile_parts(tmp_path / "out" / "Modelfile")
    assert template == ollama.TEMPLATES["llama3"] and system is None and "<|eot_id|>" in stops
    training = build_template("hf", llama3_tokenizer)
    ids_of = lambda text: llama3_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    check_modelfile_parity(template, system, stops, llama3_tokenizer, training, ids_of, CONVERSATIONS)


def test_chatglm3_modelfile_parity(glm_run, tmp_path):

    from chattune.data.templates import build_template

    glm, lora = glm_run
    export_gguf(None, lora, tmp_path / "out", console=quiet(), fmt="ollama", gguf_type="q8_0")
    template, system, stops = modelfile_parts(tmp_path / "out" / "Modelfile")
    assert template == ollama.TEMPLATES["chatglm3"] and system is None
    assert stops == ["</s>", "<|user|>", "<|observation|>"]
    tok = load_tokenizer(str(glm), str(lora), False)
    training = build_template("chatglm3", tok)
    convs = [*CONVERSATIONS, TOOL_CONVERSATION]  # tool results as Ollama's `tool` role → <|observation|>
    check_modelfile_parity(template, system, stops, tok, training, lambda t: glm_ids(tok, t), convs)


def test_renderer_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="unsupported"):
        ollama.render("{{ range .Messages }}{{ .Images }}{{ end }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="unsupported"):
        ollama.render("{{ if .Tools }}x{{ end }}", [])


# ---- the real default model (opt-in) ---------------------------------------------------------------------

DEFAULT_MODEL = Path("~/.cache/chattune/models/smollm2-135m-instruct").expanduser()


# SmolLM2-135M logits (std 8.0) against the merged fp32 model, as |got - want| / |want| over all logits:
# f16 measured 1.0e-3 (max element 0.05), q8_0 2.4e-2 (max element 1.2, 8-bit blocks through 30 layers);
# held to 5e-3 and 5e-2, with the same greedy next token at the last 8 positions.
@pytest.mark.slow
@pytest.mark.parametrize(("kind", "bound"), [("f16", 5e-3), ("q8_0", 5e-2)])
def test_default_model_lora_exports_for_ollama(kind, bound, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (DEFAULT_MODEL / ".chattune-pulled.json").is_file():
        pytest.skip(f"{DEFAULT_MODEL} is not pulled (`chattune model pull` with the default CHATTUNE_HOME)")
    lora = train(DEFAULT_MODEL, tmp_path, sums())
    path = export_gguf(None, lora, tmp_path / "out", console=quiet(), fmt="ollama", gguf_type=kind)
    assert 'PARAMETER stop "<|im_end|>"' in (path.parent / "Modelfile").read_text()
    tok = AutoTokenizer.from_pretrained(lora)
    prompt = [{"role": "user", "content": "What is 3 plus one?"}]
    text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    want = logits_of(merged_reference(DEFAULT_MODEL, lora), ids)
    got = logits_of(loaded, ids)
    error = float((got - want).norm() / want.norm())
    assert error <= bound, error
    assert torch.equal(got[0].argmax(-1)[-8:], want[0].argmax(-1)[-8:])  # the same next tokens
    gguf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi! 12345 naïve"}], tokenize=False)
    assert (
        gguf_tok(text, add_special_tokens=False)["input_ids"]
        == tok(text, add_special_tokens=False)["input_ids"]
    )
