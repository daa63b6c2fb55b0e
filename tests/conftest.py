"""Shared fixtures: tiny tokenizers and models built offline, paths into ../shared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# tiny models gain nothing from threads, and tests often share the machine with other work
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# The precisions every numerics test runs in, on every machine: a tiny model makes bf16 cheap even on a CPU
# whose bf16 matmuls are slow, so a developer on an AVX2 machine sees what an AMX machine or a GPU would.
PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(params=PRECISIONS)
def precision(request) -> str:
    """`fp32` or `bf16`: the test runs once in each (ids `fp32` and `bf16`)."""
    return request.param


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """|actual - expected| / |expected| over the whole tensor, in fp32.

    bf16 gradients are compared this way: rounding moves small elements by large fractions of themselves, so
    an element-wise relative bound would be loose everywhere to pass anywhere, while a wrong term shows in
    the norm at once.
    """
    actual, expected = actual.float(), expected.float()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


def replies_in(engine, precision: str, prompts: list, max_new_tokens: int = 64) -> list:
    """Greedy replies (parsed) of a copy of `engine`'s model cast to `precision`, one per prompt Sample.

    Fixtures that teach a tiny model a reply check it this way in every precision, so a test never hangs on
    what the model happens to say where `precision: auto` picks another precision (an AMX CPU, a GPU).
    """
    import copy
    import dataclasses

    from chattune.infer.generate import Sampling, reply_to

    cast = dataclasses.replace(engine, model=copy.deepcopy(engine.model).to(DTYPES[precision]))
    sampling = Sampling(max_new_tokens=max_new_tokens)
    return [reply_to(cast, cast.template.encode_prompt(p), sampling) for p in prompts]


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--emulate-cpu",
        choices=("avx2", "amx"),
        default=None,
        help="let `precision: auto` pick as on an AVX2-only CPU (fp32) or an AVX-512-BF16/AMX CPU (bf16), "
        "in this process and in the chattune processes tests start",
    )


def pytest_configure(config) -> None:
    emulated = config.getoption("--emulate-cpu")
    if emulated:
        import chattune.models.load

        chattune.models.load.cpu_has_fast_bf16 = lambda: emulated == "amx"
        os.environ["CHATTUNE_TEST_EMULATE_CPU"] = emulated
        path = [str(ROOT / "tests" / "emulate_cpu"), os.environ.get("PYTHONPATH", "")]
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, path))


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

CORPUS = [
    "Hello! How can I help you today? The capital of France is Paris.",
    "What is the weather in Berlin? It is sunny and 21 degrees.",
    "You are a helpful assistant. Answer briefly, in JSON when asked.",
    '{"name": "Widget", "price": 9.99, "colour": "red"} tool_call(city=\'Paris\')',
    "one two three four five six seven eight nine ten, user assistant system",
]


def build_tokenizer(template: str, specials: list[str], eos: str, bos: str | None = None):
    """A small byte-level BPE tokenizer with a chat template, trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, bos_token=bos, pad_token=specials[0])
    tok.chat_template = template
    return tok


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """A ChatML tokenizer (SmolLM2/Qwen style): replies end with <|im_end|>."""
    return build_tokenizer(CHATML_TEMPLATE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """A Llama-3-style tokenizer: header tokens and <|eot_id|>."""
    specials = [
        "<|end_of_text|>",
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    return build_tokenizer(LLAMA3_TEMPLATE, specials, eos="<|eot_id|>", bos="<|begin_of_text|>")


def save_tiny_llama(path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """A 2-layer, hidden-64 Llama (config `overrides` applied) and `tokenizer`, saved as a plain model dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    model = LlamaForCausalLM(LlamaConfig(**settings | overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)  # zero-initialised biases would hide a bias that is dropped
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    """A 2-layer, hidden-64 Llama with the ChatML tokenizer, saved as a plain model dir."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), chatml_tokenizer)


@pytest.fixture(scope="session")
def chatglm3_tokenizer_model() -> Path:
    """The real ChatGLM3 tokenizer.model from ../shared (skips when ../shared is absent)."""
    path = SHARED / "models" / "chatglm3-tokenizer" / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared is not beside the project)")
    return path


@pytest.fixture()
def shared_data() -> Path:
    """../shared/data (skips when absent)."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"{path} is absent (../shared is not beside the project)")
    return path


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own CHATTUNE_HOME, so caches never leak between tests or into ~/.cache."""
    monkeypatch.setenv("CHATTUNE_HOME", str(tmp_path_factory.mktemp("chattune-home")))


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"CHATTUNE_HOME": str(cwd / "home"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "chattune", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli(*args, cwd=DIR)`: `python -m chattune ARGS` in DIR as a user runs it, CHATTUNE_HOME=DIR/home."""
    return _run_cli
