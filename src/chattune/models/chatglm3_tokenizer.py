"""ChatGLM3 tokenizer on plain SentencePiece, as a real Hugging Face tokenizer, with no remote code.

THUDM ships ChatGLM3's tokenizer as ``tokenization_chatglm.py`` behind ``trust_remote_code``. That file is a thin
layer over one SentencePiece model (64,789 pieces) plus nine special tokens numbered after it. This module
re-implements that layer on ``transformers``' slow-tokenizer base so that ``__call__``, padding, ``decode``,
``save_pretrained`` and friends all work, and so that no code from a model directory is ever executed.

Token ids match the official tokenizer exactly:

* ordinary text -> ``sp_model.encode(text)`` (``"\\n"`` -> ``[30910, 13]``);
* ``[MASK]``=64789 ``[gMASK]``=64790 ``[sMASK]``=64791 ``sop``=64792 ``eop``=64793 ``<|system|>``=64794
  ``<|user|>``=64795 ``<|assistant|>``=64796 ``<|observation|>``=64797;
* bos=1 (``<s>``), eos=2 (``</s>``), pad=unk=0 (``<unk>``);
* ``add_special_tokens=True`` (the Hugging Face default, as in the official one) prepends ``[gMASK], sop``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from shutil import copyfile
from typing import Any, ClassVar

import sentencepiece as spm

from chattune.compat.transformers import SlowTokenizerHooks, trie_tokens

__all__ = ["ChatGLM3Tokenizer", "is_chatglm3_tokenizer_dir", "load_chatglm3_tokenizer"]

VOCAB_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Class names under which a ChatGLM3 SentencePiece tokenizer is saved: THUDM's remote-code class and ours.
CHATGLM3_TOKENIZER_CLASSES = frozenset({"ChatGLMTokenizer", "ChatGLM3Tokenizer"})

# The official order: ids are assigned from the SentencePiece vocab size upwards in exactly this order.
ROLE_SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", *ROLE_SPECIAL_TOKENS)
ROLES = ("system", "user", "assistant", "observation")


class SPTokenizer:
    """The official ``SPTokenizer`` layer: SentencePiece plus the nine ChatGLM3 special tokens after its vocab.

    Kept under the same name and attribute names as in THUDM's file so code written against
    ``tokenizer.tokenizer`` (``encode``, ``decode``, ``special_tokens``, ``n_words``...) keeps working.
    """

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"ChatGLM3 SentencePiece model not found: {model_path}")
        self.sp_model = spm.SentencePieceProcessor(model_file=model_path)
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        # The official tokenizer pads with unk: the model has no pad piece.
        self.pad_id: int = self.sp_model.unk_id()
        self.special_tokens: dict[str, int] = {}
        self.index_special_tokens: dict[int, str] = {}
        for token in SPECIAL_TOKENS:
            self.special_tokens[token] = self.n_words
            self.index_special_tokens[self.n_words] = token
            self.n_words += 1
        self.special_token_expression = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))

    def tokenize(self, s: str, encode_special_tokens: bool = False) -> list[str]:
        """Split text into pieces; special-token names become pieces only when asked to."""
        if not encode_special_tokens:
            return self.sp_model.encode_as_pieces(s)
        pieces: list[str] = []
        last = 0
        for match in self.special_token_expression.finditer(s):
            if last < match.start():
                pieces.extend(self.sp_model.encode_as_pieces(s[last : match.start()]))
            pieces.append(match.group())
            last = match.end()
        if last < len(s):
            pieces.extend(self.sp_model.encode_as_pieces(s[last:]))
        return pieces

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode text with SentencePiece only (special-token names stay plain text)."""
        ids = self.sp_model.encode(s)
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, t: list[int]) -> str:
        """Decode ids, writing special tokens by name (the official ``SPTokenizer.decode``)."""
        text, buffer = "", []
        for token in t:
            if token in self.index_special_tokens:
                if buffer:
                    text += self.sp_model.decode(buffer)
                    buffer = []
                text += self.index_special_tokens[token]
            else:
                buffer.append(token)
        if buffer:
            text += self.sp_model.decode(buffer)
        return text

    def decode_tokens(self, tokens: list[str]) -> str:
        """Join pieces into text; SentencePiece copies pieces it does not know (the special names) verbatim."""
        return self.sp_model.decode_pieces(tokens)

    def convert_token_to_id(self, token: str) -> int:
        """Piece or special-token name -> id."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.sp_model.piece_to_id(token)

    def convert_id_to_token(self, index: int) -> str:
        """Id -> piece or special-token name; '' for ids outside the vocab (as the official one)."""
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        if index < 0 or index >= self.sp_model.get_piece_size():
            return ""
        return self.sp_model.id_to_piece(index)


class ChatGLM3Tokenizer(SlowTokenizerHooks):
    """ChatGLM3's tokenizer, id-for-id equal to THUDM's ``ChatGLMTokenizer``, without remote code.

    Plain encoding (``encode``, ``__call__``, ``tokenize``) runs the text through SentencePiece only, exactly as the
    official tokenizer does: special-token names written inside user text (say a literal ``"<|user|>"`` or
    ``"[gMASK]"``) stay ordinary pieces and never become special ids, so user content cannot forge a role turn.
    Build prompts from ids instead: ``get_command`` and ``build_single_message``. (``encode_special_tokens=True``
    reproduces the official opt-in that does map those names to their ids.)

    Decoding follows the official one: ``decode(ids)`` writes the nine ChatGLM3 special tokens by name, drops
    bos/eos/pad; ``decode(ids, skip_special_tokens=True)`` also drops the nine.
    """

    vocab_files_names: ClassVar[dict[str, str]] = {"vocab_file": VOCAB_FILE}
    # position_ids are left to the model (ChatGLM3 computes them from the sequence); the official tokenizer also
    # returned them, which only works with left padding.
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]
    padding_side = "left"
    SPECIAL_TOKENS = SPECIAL_TOKENS

    def __init__(
        self,
        vocab_file: str,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        encode_special_tokens: bool = False,
        **kwargs: Any,
    ) -> None:
        # Set up SentencePiece before the base __init__: it calls get_vocab() while registering special tokens.
        self.vocab_file = str(vocab_file)
        self.name = "GLMTokenizer"
        self.tokenizer = SPTokenizer(self.vocab_file)
        self.sp_model = self.tokenizer.sp_model
        self.encode_special_tokens = encode_special_tokens
        self._base_vocab: dict[str, int] | None = None
        # The official names for bos/eos/unk/pad in get_command().
        self.special_tokens = {
            "<bos>": self.tokenizer.bos_id,
            "<eos>": self.tokenizer.eos_id,
            "<unk>": self.tokenizer.pad_id,
            "<pad>": self.tokenizer.pad_id,
        }
        # THUDM's config points AutoTokenizer at its remote code; never carry that into what we save.
        kwargs.pop("auto_map", None)
        kwargs.pop("tokenizer_file", None)
        # from_pretrained's loading flags are not tokenizer settings; keep them out of a saved config.
        kwargs.pop("is_local", None)
        kwargs.pop("local_files_only", None)
        kwargs.setdefault("name_or_path", str(Path(self.vocab_file).parent))
        sp = self.sp_model
        kwargs.setdefault("bos_token", sp.id_to_piece(sp.bos_id()))
        kwargs.setdefault("eos_token", sp.id_to_piece(sp.eos_id()))
        kwargs.setdefault("unk_token", sp.id_to_piece(sp.unk_id()))
        kwargs.setdefault("pad_token", sp.id_to_piece(sp.unk_id()))
        # Registered as special so skip_special_tokens and all_special_ids cover them; our tokenize() keeps them
        # out of the text splitter, so registering them does not make plain text map to them.
        if not kwargs.get("extra_special_tokens") and not kwargs.get("additional_special_tokens"):
            kwargs["extra_special_tokens"] = list(SPECIAL_TOKENS)
        super().__init__(
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            encode_special_tokens=encode_special_tokens,
            **kwargs,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_base_vocab"] = None  # cheap to rebuild, 64k entries not worth pickling
        return state

    # ---- the official ChatGLM3 API -------------------------------------------------------------------------

    def get_command(self, token: str) -> int:
        """Id of a special token: one of SPECIAL_TOKENS or ``<bos>``/``<eos>``/``<unk>``/``<pad>``."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        if token not in self.tokenizer.special_tokens:
            raise KeyError(f"{token!r} is not a special token for ChatGLM3")
        return self.tokenizer.special_tokens[token]

    def get_prefix_tokens(self) -> list[int]:
        """The ``[gMASK], sop`` prefix every ChatGLM3 sequence starts with."""
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """Ids of one turn: ``<|role|>`` + sp(``metadata + "\\n"``) + sp(message), as the official one."""
        if role not in ROLES:
            raise ValueError(f"unknown ChatGLM3 role {role!r}; expected one of {ROLES}")
        role_tokens = [self.get_command(f"<|{role}|>"), *self.tokenizer.encode(f"{metadata}\n")]
        return role_tokens + self.tokenizer.encode(message)

    # ---- Hugging Face tokenizer hooks ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus the nine special tokens (64,798 for ChatGLM3)."""
        return self.tokenizer.n_words

    def get_vocab(self) -> dict[str, int]:
        """Piece/special name -> id for the whole vocab, plus any tokens added later."""
        if self._base_vocab is None:
            self._base_vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab = dict(self._base_vocab)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def tokens_to_split(self, extra: list[str]) -> list[str]:
        """Only tokens added beyond the ChatGLM3 vocab (add_tokens) are split out of text; the built-in special
        tokens are not, because the official tokenizer never turns their names in text into special ids."""
        added = [t.content for i, t in self.added_tokens_decoder.items() if i >= self.vocab_size]
        return added + list(extra)

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """Text -> pieces with SentencePiece only; special-token names in text stay plain pieces."""
        kwargs.pop("split_special_tokens", None)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        added = trie_tokens(self.tokens_trie)
        if not added:
            return self._tokenize(text)
        # Tokens added with add_tokens() (ids past the ChatGLM3 vocab) are kept whole, as in any HF tokenizer.
        pieces: list[str] = []
        for chunk in self.tokens_trie.split(text):
            if chunk in added:
                pieces.append(chunk)
            elif chunk:
                pieces.extend(self._tokenize(chunk))
        return pieces

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.tokenizer.tokenize(text, encode_special_tokens=self.encode_special_tokens)

    def _convert_token_to_id(self, token: str) -> int:
        return self.tokenizer.convert_token_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.tokenizer.convert_id_to_token(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Pieces -> text the official way; bos/eos/pad/unk pieces render as nothing (official: '')."""
        silent = {self.sp_model.id_to_piece(i) for i in (self.tokenizer.bos_id, self.tokenizer.eos_id)}
        silent.add(self.sp_model.id_to_piece(self.tokenizer.pad_id))
        return self.tokenizer.decode_tokens([t for t in tokens if t not in silent])

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """``[gMASK] sop A`` for one sequence, ``[gMASK] sop A B </s>`` for a pair (as the official one)."""
        ids = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.get_command("<eos>")]
        return ids

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        """1 where build_inputs_with_special_tokens added a token, 0 over the text."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write ``tokenizer.model`` (a copy of the SentencePiece model) into save_directory."""
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"Vocabulary path ({save_directory}) should be a directory")
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        if os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(out):
                copyfile(self.vocab_file, out)
        else:
            # The source file is gone (e.g. a temp dir): the loaded model holds the same bytes.
            with open(out, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())
        return (out,)


def _read_tokenizer_config(directory: Path) -> dict[str, Any] | None:
    config_file = directory / TOKENIZER_CONFIG_FILE
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def is_chatglm3_tokenizer_dir(path: str | Path) -> bool:
    """True for a dir with ``tokenizer.model`` and no tokenizer config, or a ChatGLM(3)Tokenizer one."""
    directory = Path(path)
    if not (directory / VOCAB_FILE).is_file():
        return False
    config = _read_tokenizer_config(directory)
    if config is None:
        return True
    return config.get("tokenizer_class") in CHATGLM3_TOKENIZER_CLASSES


def load_chatglm3_tokenizer(path: str | Path, **kwargs: Any) -> ChatGLM3Tokenizer:
    """Load a ChatGLM3 tokenizer from a local dir (bare ``tokenizer.model``, ours, or THUDM's) without remote code."""
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    if not (directory / VOCAB_FILE).is_file():
        raise FileNotFoundError(f"no {VOCAB_FILE} in {directory}: not a ChatGLM3 tokenizer directory")
    config = _read_tokenizer_config(directory)
    if config is not None and config.get("tokenizer_class") not in CHATGLM3_TOKENIZER_CLASSES:
        raise ValueError(
            f"{directory / TOKENIZER_CONFIG_FILE} names tokenizer_class {config.get('tokenizer_class')!r}, "
            f"not one of {sorted(CHATGLM3_TOKENIZER_CLASSES)}"
        )
    # local_files_only: a local dir never needs the Hub, and this machine may have no network at all.
    return ChatGLM3Tokenizer.from_pretrained(str(directory), local_files_only=True, **kwargs)
