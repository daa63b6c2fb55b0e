"""Input-output data on any tokenizer: bos? + prompt, then response + eos; only the response and eos learnt."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chattune.data.schema import Pair, Sample
from chattune.data.templates.base import (
    IGNORE_INDEX,
    TEMPLATES,
    AnswersOnly,
    Encoded,
    Limits,
    ParsedReply,
    split_pair_budget,
)
from chattune.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's own encoding starts with bos (then raw data keeps that convention)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]


@TEMPLATES.register("raw")
class RawTemplate(AnswersOnly):
    """No role markers: what prompt/response and context/target data are trained with on non-ChatGLM3 models."""

    name = "raw"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, limits: Limits):
        self.tok, self.limits = tokenizer, limits
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                f"the tokenizer of {tokenizer.name_or_path} has no eos token; raw data needs one"
            )
        self.prefix = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []

    def _plain(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode(self, sample: Sample) -> list[Encoded]:
        """Ids and labels for an input-output pair (one sample)."""
        pair = self._pair(sample)
        src, tgt, truncated = split_pair_budget(pair, self._plain, self.limits, len(self.prefix))
        prompt = self.prefix + src
        target = [*tgt, self.tok.eos_token_id]
        return [Encoded(prompt + target, [IGNORE_INDEX] * len(prompt) + target, truncated)]

    def encode_prompt(self, sample: Sample) -> list[int]:
        """The prompt ids the model continues from."""
        pair = self._pair(sample)
        src, _, _ = split_pair_budget(Pair(pair.prompt, ""), self._plain, self.limits, len(self.prefix))
        return self.prefix + src

    def stop_token_ids(self) -> list[int]:
        """Just eos."""
        return [self.tok.eos_token_id]

    def parse_reply(self, text: str, final: bool = True) -> ParsedReply:
        """Raw replies are plain text."""
        return ParsedReply(text.strip())

    def _pair(self, sample: Sample) -> Pair:
        if not isinstance(sample, Pair):
            raise ConfigError(
                "template 'raw' encodes prompt/response or context/target data only; this is a conversation "
                "(use template: hf or chatglm3)"
            )
        return sample
