"""Every private name chattune.compat relies on still exists with the shape it assumes (fails loudly on upgrade)."""

from __future__ import annotations

import inspect

import transformers
from transformers import AttentionInterface, GenerationConfig, LlamaConfig, Trainer

from chattune.compat import transformers as compat


def test_written_against_the_installed_transformers() -> None:
    installed = ".".join(transformers.__version__.split(".")[:2])
    assert installed == ".".join(compat.WRITTEN_AGAINST.split(".")[:2]), (
        f"compat/transformers.py was written against {compat.WRITTEN_AGAINST}, transformers is "
        f"{transformers.__version__}: check each entry there, then update WRITTEN_AGAINST and pyproject.toml"
    )


def test_trainer_hooks_exist_with_the_parameters_we_pass() -> None:
    for name, params in compat.TRAINER_HOOKS.items():
        assert hasattr(Trainer, name), f"Trainer.{name} is gone"
        if params is not None:
            got = tuple(inspect.signature(getattr(Trainer, name)).parameters)[1:]
            assert got[: len(params)] == params, f"Trainer.{name}{got}"
    assert {n for n in vars(compat.TrainerHooks) if n.startswith("_") and not n.startswith("__")} == set(
        compat.TRAINER_HOOKS
    ), "every private hook TrainerHooks overrides is listed (and so checked) in TRAINER_HOOKS"


def test_model_and_generation_internals() -> None:
    assert (
        isinstance(AttentionInterface._global_mapping, dict) and "sdpa" in AttentionInterface._global_mapping
    )
    assert compat.attention_registered("sdpa") and not compat.attention_registered("no-such-attention")
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config._attn_implementation = "sdpa"
    assert compat.attention_implementation(config) == "sdpa"
    compat.set_name_or_path(config, "my-model")
    assert config.name_or_path == "my-model" and compat.name_or_path(config) == "my-model"
    generation = GenerationConfig.from_model_config(config)
    assert generation._from_model_config is True
    compat.keep_generation_config(generation)
    assert generation._from_model_config is False


def test_tokenizer_and_template_internals() -> None:
    from transformers.tokenization_python import Trie

    trie = Trie()
    trie.add("<|user|>")
    assert compat.trie_tokens(trie) == {"<|user|>"}
    template = compat.compile_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert template.render(messages=[{"content": "a"}, {"content": "b"}]) == "ab"


def test_gguf_loading_can_be_quietened() -> None:
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    before = getattr(gguf_utils, "tqdm", None)
    with compat.quiet_gguf_loading():
        if before is not None:
            assert gguf_utils.tqdm is not before
    assert getattr(gguf_utils, "tqdm", None) is before


def test_slow_tokenizer_hook_exists() -> None:
    from transformers.tokenization_python import PreTrainedTokenizer

    for name, params in compat.TOKENIZER_HOOKS.items():
        assert hasattr(PreTrainedTokenizer, name), f"PreTrainedTokenizer.{name} is gone"
        assert tuple(inspect.signature(getattr(PreTrainedTokenizer, name)).parameters)[1:] == params
    private = {n for n in vars(compat.SlowTokenizerHooks) if n.startswith("_") and not n.startswith("__")}
    assert private == set(compat.TOKENIZER_HOOKS)
