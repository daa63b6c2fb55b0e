"""Generation: batched (left-padded, sorted by length) or streamed, stopping on the template's stop tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from queue import SimpleQueue
from threading import Event, Thread
from typing import Any

import torch

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


def reply_to(engine: Engine, ids: list[int], sampling: Sampling) -> ParsedReply:
    """The model's whole reply to prompt ids (no streaming), parsed by its template."""
    return engine.template.parse_reply(generate_batch(engine, [ids], sampling, batch_size=1)[0])


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


class Generation:
    """One reply generated on a thread of its own: the one place that runs `model.generate` in the background.

    Text pieces go to `on_text` as they are decoded, and `on_end()` is called once generate has returned or
    raised, both on the generating thread; `result()` then gives the new token ids (the stop token included
    when one was generated) or re-raises generate's error in the caller's thread. Setting `cancel` stops
    generation at the next token.
    """

    def __init__(
        self,
        engine: Engine,
        prompt_ids: list[int],
        sampling: Sampling,
        *,
        on_text: Callable[[str], object],
        on_end: Callable[[], object],
        cancel: Event | None = None,
    ):
        self.engine, self.prompt_ids, self.sampling = engine, prompt_ids, sampling
        self.on_text, self.on_end = on_text, on_end
        # our own event when none is given: a consumer that stops reading still stops generation through it
        self.cancel = cancel if cancel is not None else Event()
        self.tokens: list[int] | None = None
        self.error: BaseException | None = None
        self._thread = Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Begin generating in the background."""
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the generating thread to finish."""
        self._thread.join(timeout)

    def result(self) -> list[int]:
        """The new token ids once generation has ended; generate's error, if it raised, is raised here."""
        if self.error is not None:
            raise self.error
        if self.tokens is None:
            raise RuntimeError("the generation has not ended yet")
        return self.tokens

    def _run(self) -> None:
        from transformers import TextStreamer

        on_text = self.on_text

        class Relay(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                on_text(text)

        engine = self.engine
        try:
            if self.sampling.seed is not None:
                torch.manual_seed(self.sampling.seed)
            device = next(engine.model.parameters()).device
            inputs = _left_pad([self.prompt_ids], engine.tokenizer.pad_token_id, device)
            streamer = Relay(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
            kwargs = self.sampling.generate_kwargs(engine) | {
                "streamer": streamer,
                "stopping_criteria": _cancel_criteria(self.cancel),
            }
            try:
                with torch.no_grad():
                    out = engine.model.generate(**inputs, **kwargs)
            except BaseException:
                streamer.end()  # pass on the text decoded so far, as a generation that ended would
                raise
            self.tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
        except BaseException as e:  # re-raised in the consumer's thread by `result()`
            self.error = e
        finally:
            self.on_end()


_END = object()  # what a `Stream`'s queue holds after the last piece


class Stream:
    """The reply as it is generated, in text pieces; once iteration ends, `tokens` holds the new token ids.

    Generation starts with the first piece asked for; generate's error is raised in the consumer. When the
    consumer stops reading early (closed iterator, Ctrl-C), generation is cancelled and waited for.
    """

    def __init__(
        self, engine: Engine, prompt_ids: list[int], sampling: Sampling, cancel: Event | None = None
    ):
        self.tokens: list[int] | None = None
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._generation = Generation(
            engine,
            prompt_ids,
            sampling,
            on_text=self._queue.put,
            on_end=lambda: self._queue.put(_END),
            cancel=cancel,
        )
        self._pieces = self._read()

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop reading: cancel generation and wait for it to end."""
        self._pieces.close()

    def _read(self) -> Iterator[str]:
        generation = self._generation
        generation.start()
        try:
            while (piece := self._queue.get()) is not _END:
                yield piece
        finally:
            generation.cancel.set()
            generation.join()
        self.tokens = generation.result()


def stream(engine: Engine, prompt_ids: list[int], sampling: Sampling, cancel: Event | None = None) -> Stream:
    """Yield the reply as it is generated (text pieces); setting `cancel` stops generation at the next token.

    After the last piece, the returned `Stream`'s `tokens` holds the new token ids.
    """
    return Stream(engine, prompt_ids, sampling, cancel)
