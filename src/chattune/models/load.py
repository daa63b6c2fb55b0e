"""One loader for tokenizers and models, used by every command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chattune.errors import ModelLoadError


def resolve_path(name_or_path: str) -> str:
    """A local dir as is; a default-model alias pulled into the cache; a hub id checked (clear offline error)."""
    from chattune.models.pull import resolve_model

    return resolve_model(name_or_path)


def load_tokenizer(model: str, tokenizer: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer for a model: ChatGLM3 dirs get ours (no remote code), others AutoTokenizer."""
    from chattune.data.tokenizers.chatglm3 import is_chatglm3_tokenizer_dir, load_chatglm3_tokenizer

    path = resolve_path(tokenizer or model)
    if Path(path).is_dir() and is_chatglm3_tokenizer_dir(path) and not trust_remote_code:
        return load_chatglm3_tokenizer(path)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types here; the user needs one clear message
        raise ModelLoadError(f"could not load a tokenizer from {path}: {e}") from e
    if tok.pad_token_id is None:
        # batching needs a pad id; eos is the usual stand-in and never a learnt position when padding
        tok.pad_token = tok.eos_token
    return tok
