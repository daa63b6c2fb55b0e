"""Generation: batched (left-padded, sorted by length) or streamed, stopping on the template's stop tokens."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from threading import Event, Thread
from typing import Any

import torch

from chattune.data.schema import Sample
from chattune.data.templates import ParsedReply
from chattune.infer.engine import Engine


@dataclass
class Sampling:
    """How to pick tokens; greedy unless do_sample."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    do_sample: bool = False
    seed: int | None = None

    def generate_kwargs(self, engine: Engine) -> dict[str, Any]:
        """Keyword arguments for `model.generate`."""
        kw: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "eos_token_id": engine.template.stop_token_ids(),
            "pad_token_id": engine.tokenizer.pad_token_id,
        }
        if self.do_sample:
            kw |= {"temperature": self.temperature, "top_p": self.top_p}
        else:  # silence the model's sampling defaults, which would otherwise warn under greedy decoding
            kw |= {"temperature": None, "top_p": None, "top_k": None}
        return kw


def _left_pad(rows: Sequence[list[int]], pad_id: int, device: Any) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.as_tensor(r)
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _cut_at_stop(tokens: list[int], stops: list[int], pad_id: int) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return [t for t in tokens if t != pad_id]


def generate_batch(
    engine: Engine,
    prompts: Sequence[list[int]],
    sampling: Sampling,
    batch_size: int = 8,
    progress: Any = None,
) -> list[str]:
    """Raw reply texts for many prompt id lists, in input order (parse them with `template.parse_reply`).

    Longest-first batches waste the least padding.
    """
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    kwargs = sampling.generate_kwargs(engine)
    stops = kwargs["eos_token_id"]
    device = next(engine.model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        inputs = _left_pad([prompts[i] for i in idx], engine.tokenizer.pad_token_id, device)
        with torch.no_grad():
            out = engine.model.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1] :].tolist()
        for i, tokens in zip(idx, new, strict=True):
            replies[i] = engine.tokenizer.decode(
                _cut_at_stop(tokens, stops, engine.tokenizer.pad_token_id), skip_special_tokens=True
            )
        if progress is not None:
            progress(len(idx))
    return replies


def generate_one(engine: Engine, sample: Sample, sampling: Sampling) -> ParsedReply:
    """The reply to one sample, encoded exactly as training encoded its format."""
    raw = generate_batch(engine, [engine.template.encode_prompt(sample)], sampling, batch_size=1)[0]
    return engine.template.parse_reply(raw)


def _cancel_criteria(cancel: Event) -> Any:
    """A stopping criterion that ends generation at the next token once `cancel` is set."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(
            self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
        ) -> torch.Tensor:
            return torch.full(
                (input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return StoppingCriteriaList([Cancelled()])


def stream(
    engine: Engine, prompt_ids: list[int], sampling: Sampling, cancel: Event | None = None
) -> Iterator[str]:
    """Yield the reply as it is generated (text pieces); setting `cancel` stops generation at the next token."""
    from transformers import TextIteratorStreamer

    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    device = next(engine.model.parameters()).device
    inputs = _left_pad([prompt_ids], engine.tokenizer.pad_token_id, device)
    streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
    # our own event also stops generation when the consumer stops reading (closed generator, Ctrl-C)
    stop = cancel if cancel is not None else Event()
    kwargs = sampling.generate_kwargs(engine) | {
        "streamer": streamer,
        "stopping_criteria": _cancel_criteria(stop),
    }
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                engine.model.generate(**inputs, **kwargs)
        except BaseException as e:  # re-raised in the consumer's thread below
            failure.append(e)
            streamer.end()  # unblock the consumer, which would otherwise wait for text forever

    worker = Thread(target=run, daemon=True)
    worker.start()
    try:
        yield from streamer
    finally:
        stop.set()
        worker.join()
    if failure:
        raise failure[0]
