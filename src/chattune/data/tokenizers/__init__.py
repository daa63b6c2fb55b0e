"""Tokenizers chattune loads itself, without a model directory's remote code."""

from chattune.data.tokenizers.chatglm3 import (
    ChatGLM3Tokenizer,
    is_chatglm3_tokenizer_dir,
    load_chatglm3_tokenizer,
)

__all__ = ["ChatGLM3Tokenizer", "is_chatglm3_tokenizer_dir", "load_chatglm3_tokenizer"]
