"""ChatGLM3 tokenizer: ids, prompt building, padding, save/load, decode, against the real SentencePiece model."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from chattune.models.chatglm3_tokenizer import (
    ChatGLM3Tokenizer,
    is_chatglm3_tokenizer_dir,
    load_chatglm3_tokenizer,
)

# The real model lives beside the project (../shared), not inside it.
MODEL_FILE = Path(__file__).resolve().parents[3] / "shared/models/chatglm3-tokenizer/tokenizer.model"

EXPECTED_SPECIAL_IDS = {
    "[MASK]": 64789,
    "[gMASK]": 64790,
    "[sMASK]": 64791,
    "sop": 64792,
    "eop": 64793,
    "<|system|>": 64794,
    "<|user|>": 64795,
    "<|assistant|>": 64796,
    "<|observation|>": 64797,
}

CONVERSATION = [
    ("system", "You are a helpful assistant."),
    ("user", "Hi"),
    ("assistant", "Hello!"),
    ("user", "Bye"),
    ("assistant", "Goodbye."),
]
# The ids THUDM's tokenizer gives for CONVERSATION: [gMASK] sop, each turn, </s>.
CONVERSATION_IDS = [
    64790, 64792, 64794, 30910, 13, 809, 383, 260, 6483, 9319, 30930, 64795, 30910, 13, 8686, 64796, 30910, 13,
    13755, 30992, 64795, 30910, 13, 1690, 30911, 64796, 30910, 13, 3574, 16232, 30930, 2,
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not MODEL_FILE.is_file():
        pytest.skip(f"../shared/models/chatglm3-tokenizer is absent ({MODEL_FILE} not found)")
    directory = tmp_path_factory.mktemp("chatglm3-bare")
    shutil.copy(MODEL_FILE, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> ChatGLM3Tokenizer:
    return load_chatglm3_tokenizer(model_dir)


def build_conversation(tok: ChatGLM3Tokenizer) -> list[int]:
    ids = tok.get_prefix_tokens()
    for role, message in CONVERSATION:
        ids += tok.build_single_message(role, "", message)
    return [*ids, tok.eos_token_id]


def test_special_ids_and_sizes(tok: ChatGLM3Tokenizer, model_dir: Path) -> None:
    assert list(tok.SPECIAL_TOKENS) == list(EXPECTED_SPECIAL_IDS)
    for name, expected in EXPECTED_SPECIAL_IDS.items():
        assert tok.get_command(name) == expected
        assert tok.convert_tokens_to_ids(name) == expected
        assert tok.convert_ids_to_tokens(expected) == name
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 0, 0)
    assert tok.get_command("<eos>") == 2
    assert tok.get_command("<pad>") == 0
    assert len(tok) == tok.vocab_size == 64798
    assert tok.sp_model.get_piece_size() == 64789
    assert set(tok.all_special_ids) == {0, 1, 2, *EXPECTED_SPECIAL_IDS.values()}
    assert tok.name_or_path == str(model_dir)
    with pytest.raises(KeyError):
        tok.get_command("<|nobody|>")


def test_plain_encode_is_sentencepiece(tok: ChatGLM3Tokenizer) -> None:
    assert tok.encode("\n", add_special_tokens=False) == [30910, 13]
    # As the official tokenizer (and every HF tokenizer), add_special_tokens defaults to True.
    assert tok.encode("\n") == [64790, 64792, 30910, 13]
    assert tok.encode("\n", add_special_tokens=True) == [64790, 64792, 30910, 13]
    for text in ["Hello, world!", "  two  spaces\tand\n\nnewlines ", "类型#上衣*材质#牛仔布", "emoji 😀", ""]:
        assert tok.encode(text, add_special_tokens=False) == tok.sp_model.encode(text)


def test_worked_conversation(tok: ChatGLM3Tokenizer) -> None:
    assert build_conversation(tok) == CONVERSATION_IDS
    assert tok.build_single_message("user", "", "Hi") == [64795, 30910, 13, 8686]
    # metadata goes before the newline, e.g. a tool name on an observation turn.
    assert tok.build_single_message("observation", "tool", "x") == (
        [64797, *tok.sp_model.encode("tool\n"), *tok.sp_model.encode("x")]
    )
    with pytest.raises(ValueError):
        tok.build_single_message("narrator", "", "x")


def test_special_token_text_stays_plain(tok: ChatGLM3Tokenizer) -> None:
    text = "<|user|> [gMASK] sop <|assistant|> </s> <unk>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == tok.sp_model.encode(text)
    assert not set(ids) & set(tok.all_special_ids)
    # A text that is exactly a special name is still plain text.
    assert tok.encode("<|user|>", add_special_tokens=False) == tok.sp_model.encode("<|user|>")
    assert tok("<|observation|>")["input_ids"][2:] == tok.sp_model.encode("<|observation|>")


def test_decode(tok: ChatGLM3Tokenizer) -> None:
    text = "类型#上衣*材质#牛仔布"
    ids = tok.encode(text)
    assert ids[:2] == [64790, 64792]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[2:]) == text
    assert tok.decode(ids) == "[gMASK]sop " + text  # special names kept verbatim, as DecodePieces does
    assert tok.convert_ids_to_tokens(CONVERSATION_IDS[:6]) == [
        "[gMASK]",
        "sop",
        "<|system|>",
        "▁",
        "<0x0A>",
        "▁You",
    ]
    decoded = tok.decode(CONVERSATION_IDS)
    assert decoded.startswith("[gMASK]sop<|system|>")
    assert "<|assistant|>" in decoded
    assert not decoded.endswith("</s>")  # eos renders as nothing, as in the official tokenizer
    skipped = tok.decode(CONVERSATION_IDS, skip_special_tokens=True)
    assert not any(name in skipped for name in ("<|user|>", "[gMASK]", "sop", "</s>"))
    assert "Goodbye." in skipped
    # Left padding (pad = 0) disappears even without skip_special_tokens.
    assert tok.decode([0, 0, *ids[2:]]) == text


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(tok: ChatGLM3Tokenizer, side: str) -> None:
    texts = ["Hi", "类型#上衣*材质#牛仔布, a longer one"]
    batch = tok(texts, padding=True, return_tensors="pt", padding_side=side)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert isinstance(ids, torch.Tensor) and ids.shape == mask.shape and ids.shape[0] == 2
    short = tok.encode(texts[0])
    n_pad = ids.shape[1] - len(short)
    assert n_pad > 0
    row = ids[0].tolist()
    if side == "left":
        assert row == [0] * n_pad + short
        assert mask[0].tolist() == [0] * n_pad + [1] * len(short)
    else:
        assert row == short + [0] * n_pad
        assert mask[0].tolist() == [1] * len(short) + [0] * n_pad
    assert ids[1].tolist() == tok.encode(texts[1])
    assert mask[1].all()


def test_padding_side_attribute(model_dir: Path) -> None:
    tok = load_chatglm3_tokenizer(model_dir)
    assert tok.padding_side == "left"  # the official default
    tok.padding_side = "right"
    batch = tok(["a", "a b c"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, -1].item() == tok.pad_token_id


def test_save_and_reload_from_bare_model(tok: ChatGLM3Tokenizer, tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    tok.save_pretrained(saved)
    assert (saved / "tokenizer.model").read_bytes() == MODEL_FILE.read_bytes()
    config = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "ChatGLM3Tokenizer"
    assert "auto_map" not in config
    assert is_chatglm3_tokenizer_dir(saved)

    again = load_chatglm3_tokenizer(saved)
    assert isinstance(again, ChatGLM3Tokenizer)
    assert again.name_or_path == str(saved)
    assert len(again) == len(tok)
    assert again.all_special_ids == tok.all_special_ids
    assert (again.eos_token_id, again.pad_token_id, again.bos_token_id) == (2, 0, 1)
    assert again.padding_side == tok.padding_side
    assert build_conversation(again) == CONVERSATION_IDS
    for text in ["\n", "类型#上衣*材质#牛仔布", "<|user|> plain"]:
        assert again.encode(text) == tok.encode(text)
        assert again.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_thudm_style_dir_loads_without_remote_code(model_dir: Path, tmp_path: Path) -> None:
    thudm = tmp_path / "chatglm3-6b"
    thudm.mkdir()
    shutil.copy(model_dir / "tokenizer.model", thudm / "tokenizer.model")
    # No tokenization_chatglm.py beside it: loading must not need (or run) remote code.
    (thudm / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "name_or_path": "THUDM/chatglm3-6b",
                "remove_space": False,
                "do_lower_case": False,
                "tokenizer_class": "ChatGLMTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
                "padding_side": "left",
                "clean_up_tokenization_spaces": False,
            }
        ),
        encoding="utf-8",
    )
    assert is_chatglm3_tokenizer_dir(thudm)
    tok = load_chatglm3_tokenizer(thudm)
    assert isinstance(tok, ChatGLM3Tokenizer)
    assert tok.name_or_path == str(thudm)
    assert build_conversation(tok) == CONVERSATION_IDS
    assert len(tok) == 64798
    tok.save_pretrained(tmp_path / "resaved")
    config = json.loads((tmp_path / "resaved/tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "ChatGLM3Tokenizer"
    assert "auto_map" not in config


def test_is_chatglm3_tokenizer_dir(model_dir: Path, tmp_path: Path) -> None:
    assert is_chatglm3_tokenizer_dir(model_dir)
    assert not is_chatglm3_tokenizer_dir(tmp_path)  # empty
    smol = tmp_path / "smollm2"
    smol.mkdir()
    (smol / "tokenizer.json").write_text("{}", encoding="utf-8")
    (smol / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer"}), encoding="utf-8"
    )
    assert not is_chatglm3_tokenizer_dir(smol)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "tokenizer.model").write_bytes(b"")
    (llama / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer"}), encoding="utf-8"
    )
    assert not is_chatglm3_tokenizer_dir(llama)
    with pytest.raises(ValueError):
        load_chatglm3_tokenizer(llama)
    with pytest.raises(FileNotFoundError):
        load_chatglm3_tokenizer(smol)


def test_pickles(tok: ChatGLM3Tokenizer) -> None:
    # datasets.map(num_proc=...) pickles the tokenizer into worker processes.
    clone = pickle.loads(pickle.dumps(tok))
    assert build_conversation(clone) == CONVERSATION_IDS
    assert clone.decode(CONVERSATION_IDS) == tok.decode(CONVERSATION_IDS)
