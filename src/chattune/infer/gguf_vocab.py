"""The tokenizer, special tokens and chat template a GGUF carries: the ones the run trained with.

Two tokenizer kinds are written: byte-level BPE (`gpt2` in llama.cpp: SmolLM2, Llama 3, Qwen) from the fast
tokenizer's vocab and merges, and ChatGLM3's SentencePiece model (`llama` in llama.cpp, pre-tokenizer
`chatglm-spm`) with its nine control tokens after the pieces. Ids past the tokenizer (a padded embedding)
become unused `[PAD<id>]` tokens so the vocab matches the embedding rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chattune.data.schema import TOOLS_SYSTEM_PREFIX
from chattune.data.templates.base import is_chatglm3_tokenizer
from chattune.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# ChatGLM3's training encoding as Jinja, for llama.cpp's and transformers' chat-template renderers.
# `<|role|>` + sp("\n") + sp(content) is what training feeds; a SentencePiece pass over "\n content" gives
# the same ids (its dummy prefix lands before "\n", the written space before the content), and empty
# content writes no space. Tool definitions open the conversation as ChatGLM3's tools system message.
# Newlines after a block tag are written as expressions: Jinja's trim_blocks (on in transformers and
# llama.cpp's renderer) drops a literal one.
CHATGLM3_JINJA = (
    "[gMASK]sop"
    "{% if tools %}<|system|>\n " + TOOLS_SYSTEM_PREFIX + "{{ tools | tojson(indent=4) }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] in ['tool', 'observation'] %}<|observation|>"
    "{% else %}<|{{ message['role'] }}|>{% endif %}{{ '\\n' }}"
    "{% if message['content'] %} {{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chat_template_for(template: Any) -> str | None:
    """The Jinja chat template that renders what `template` trained on; None for `raw` (no chat format)."""
    if template.name == "chatglm3":
        return CHATGLM3_JINJA
    if template.name == "hf":
        return template.tok.chat_template
    return None


def tokenizer_kind(tok: PreTrainedTokenizerBase) -> str:
    """`spm` for ChatGLM3's SentencePiece tokenizer, `bpe` for a byte-level BPE one; else a ConfigError."""
    if is_chatglm3_tokenizer(tok):
        return "spm"
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        kinds = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
        if spec["model"]["type"] == "BPE" and "ByteLevel" in kinds:
            return "bpe"
    raise ConfigError(
        f"the tokenizer of {tok.name_or_path} is neither byte-level BPE (SmolLM2, Llama 3, Qwen) nor "
        "ChatGLM3's SentencePiece, which are the kinds GGUF export writes (SentencePiece Llama 2 / Mistral "
        "tokenizers are not written yet); export with --format hf and convert with llama.cpp"
    )


def adds_bos(tok: PreTrainedTokenizerBase, chat_template: str | None) -> bool:
    """Whether llama.cpp should put bos first: where the tokenizer does and the chat template does not."""
    bos = tok.bos_token_id
    if bos is None or is_chatglm3_tokenizer(tok):
        return False  # ChatGLM3's template writes its own [gMASK]sop prefix
    if tok("x", add_special_tokens=True)["input_ids"][:1] != [bos]:
        return False
    if chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        return not text.startswith(tok.bos_token)
    return True


def _bpe_tokens(tok: PreTrainedTokenizerBase, n_vocab: int) -> tuple[list[str], list[int]]:
    import gguf

    T = gguf.TokenType
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(T.NORMAL if i not in added else T.CONTROL if added[i].special else T.USER_DEFINED)
    return tokens, types


def _spm_tokens(tok: PreTrainedTokenizerBase, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    import gguf

    T = gguf.TokenType
    sp = tok.tokenizer.sp_model
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        if i < sp.vocab_size():
            piece, score = sp.id_to_piece(i), sp.get_score(i)
            kind = (
                T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL
            )  # fmt: skip
        elif i < len(tok):
            piece, score, kind = tok.convert_ids_to_tokens(i), 0.0, T.CONTROL
        else:
            piece, score, kind = f"[PAD{i}]", 0.0, T.UNUSED
        tokens.append(piece.encode("utf-8"))
        scores.append(score)
        types.append(kind)
    return tokens, scores, types


def _bpe_pre(tok: PreTrainedTokenizerBase, model_type: str) -> str:
    """llama.cpp's name for the pre-tokenizer regex (transformers ignores it; llama.cpp splits with it)."""
    if model_type in ("qwen2", "qwen3"):
        return "qwen2"
    vocab = tok.get_vocab()
    if "<|begin_of_text|>" in vocab:
        return "llama-bpe"
    spec = json.loads(tok.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if "Digits" in json.dumps(spec):
        return "smollm"  # SmolLM's digits-split-then-byte-level
    return "gpt-2"


def tokenizer_metadata(
    tok: PreTrainedTokenizerBase, template: Any, tok_dir: Path, n_vocab: int, model_type: str
) -> Any:
    """A function that adds the tokenizer, special-token and chat-template keys to a GGUFWriter."""
    import gguf

    kind = tokenizer_kind(tok)
    chat_template = chat_template_for(template)
    stops = [s for s in template.stop_token_ids() if s != tok.eos_token_id]

    def write(writer: Any) -> None:
        if kind == "spm":
            tokens, scores, types = _spm_tokens(tok, n_vocab)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("chatglm-spm")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            writer.add_add_space_prefix(True)  # ChatGLM3's SentencePiece model adds a dummy prefix
            special = gguf.SpecialVocab(tok_dir, special_token_types=(), n_vocab=n_vocab)
        else:
            bpe_tokens, types = _bpe_tokens(tok, n_vocab)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(_bpe_pre(tok, model_type))
            writer.add_token_list(bpe_tokens)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(tok_dir, load_merges=True, special_token_types=(), n_vocab=n_vocab)
            if not special.merges:
                raise ConfigError(f"the tokenizer of {tok.name_or_path} has no BPE merges to write")
        ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id}
        ids |= {"pad": tok.pad_token_id, "eot": stops[0] if stops else None}
        ids |= {"eom": stops[1] if len(stops) > 1 else None}
        special.special_token_ids = {k: int(v) for k, v in ids.items() if v is not None}
        special.add_special_token = {"bos": adds_bos(tok, chat_template), "eos": False}
        special.chat_template = chat_template
        special.add_to_gguf(writer, quiet=True)

    return write
