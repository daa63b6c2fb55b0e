"""Read → validate → template → mask a whole file into a cached, memory-mapped dataset, with statistics."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import multiprocessing
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from chattune import __version__
from chattune.data.formats import ReadReport, read_samples
from chattune.data.readers import check_file
from chattune.data.schema import Conversation, Sample, SourceRecord
from chattune.data.templates import Encoded, Template
from chattune.errors import DataFormatError
from chattune.system import available_cores

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:  # `datasets` costs about a second to import; `data check` on a cached file never needs it
    import datasets

# bump when encoding changes in a way old caches must not be reused for
ENCODING_REVISION = 4
# files with more samples than this are encoded by a pool of worker processes (one per core): below it,
# starting the pool costs more than it saves
PARALLEL_AFTER = 2048
_CHUNK = 256
# `length` lets the length-grouped sampler batch similar lengths without reading every row; `reasoning`
# holds the token ranges of reasoning traces ([lo, hi, ...]) for data check's sanity print
_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("length", pa.int32()),
        ("reasoning", pa.list_(pa.int32())),
    ]
)


@dataclass
class DataStats:
    """What preprocessing did to one file; nothing is dropped without being counted here."""

    file: str
    read: int = 0
    kept: int = 0
    skipped_bad: int = 0
    dropped_no_target: int = 0
    truncated: int = 0
    split_records: int = 0  # records encoded as one sample per trained turn (see templates/turns.py)
    split_extra_tokens: int = 0
    reasoning_tokens: int = 0  # tokens of assistant reasoning traces
    reasoning_trained: bool = True  # false with train_reasoning: false (the traces are context only)
    tokens: int = 0
    trained_tokens: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    bad_examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the template's warnings
    unknown_fields: dict[str, dict[str, Any]] = field(default_factory=dict)  # see ReadReport
    extra_fields: dict[str, int] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list, repr=False)
    cached: bool = False

    def percentiles(self) -> dict[str, int]:
        """Sample length percentiles (tokens)."""
        if not self.lengths:
            return {}
        s = sorted(self.lengths)
        return {f"p{q}": s[min(len(s) - 1, int(len(s) * q / 100))] for q in (50, 90, 99)} | {"max": s[-1]}


def file_identity(st: os.stat_result) -> list[int]:
    """What tells one version of a file from another without reading it: size, mtime, ctime and inode.

    ctime and inode also catch a file replaced by one with the same size and mtime (cp -p, rsync -t), which
    no user-level call can give the old ctime.
    """
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of what decides the tokenizer's output (class, vocab size, specials, chat template, files)."""
    h = hashlib.sha256()
    parts = [type(tokenizer).__name__, str(len(tokenizer)), str(getattr(tokenizer, "chat_template", ""))]
    parts.append(str(getattr(tokenizer, "all_special_tokens", "")))
    src = Path(str(getattr(tokenizer, "name_or_path", "")))
    if src.is_dir():
        for f in sorted(src.glob("tokenizer*")):
            parts.append(f"{f.name}:{file_identity(f.stat())}")
    h.update("\n".join(parts).encode())
    return h.hexdigest()[:16]


def cache_key(
    path: Path, template: Template, tokenizer: PreTrainedTokenizerBase, settings: dict[str, Any]
) -> str:
    """Identifies one preprocessing result: the file's identity, the template, tokenizer and settings."""
    key = {
        "file": str(path.resolve()),
        "identity": file_identity(path.stat()),
        "template": template.name,
        "limits": asdict(template.limits),
        "train_reasoning": template.train_reasoning,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": settings,
        "version": [__version__, ENCODING_REVISION],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _encode_stream(
    path: Path,
    template: Template,
    fmt: str,
    on_bad_record: str,
    strict_fields: bool,
    stats: DataStats,
    progress: Any,
) -> Iterator[EncodedChunk]:
    report = ReadReport()
    records = read_samples(path, fmt, on_bad_record, report, strict_fields=strict_fields)
    samples = (_with_place_for_reasoning(record, sample, template) for record, sample in records)
    for chunk in encode_chunks(samples, template):
        stats.truncated += chunk.truncated
        stats.split_records += chunk.split_records
        stats.split_extra_tokens += chunk.split_extra_tokens
        kept = chunk.trained > 0  # never hand the trainer a sample with nothing to learn
        if not kept.all():
            stats.dropped_no_target += int((~kept).sum())
            chunk = chunk.select(kept)
        stats.kept += len(chunk.lengths)
        stats.reasoning_tokens += int((chunk.reasoning[1::2] - chunk.reasoning[::2]).sum())
        stats.tokens += int(chunk.lengths.sum())
        stats.trained_tokens += int(chunk.trained.sum())
        stats.lengths.extend(chunk.lengths.tolist())
        if progress is not None:
            progress(stats.kept)
        yield chunk
    stats.read, stats.skipped_bad, stats.bad_examples = report.read, report.skipped, report.examples
    stats.formats = report.formats
    stats.notes = template.notes()
    stats.reasoning_trained = template.train_reasoning
    stats.unknown_fields, stats.extra_fields = report.unknown_fields, report.extra_fields


def _with_place_for_reasoning(record: SourceRecord, sample: Sample, template: Template) -> Sample:
    """`sample`, unless it carries reasoning the template has no place for: then an error naming the record."""
    reasoned = isinstance(sample, Conversation) and any(m.reasoning for m in sample.messages)
    if reasoned and not template.supports_reasoning():
        raise DataFormatError(
            f"an assistant turn carries reasoning, but template {template.name!r} has no place for it "
            "and it would be lost; use a chat template that writes reasoning (template: hf with a "
            "reasoning model's tokenizer, e.g. Qwen3 or DeepSeek-R1), or remove the reasoning fields",
            file=record.file,
            line=record.line,
            field="reasoning",
        )
    return sample


@dataclass
class EncodedChunk:
    """Consecutive encoded samples as flat int32 arrays: cheap to send from a worker and to hand to Arrow.

    Python lists of ints cost ~3 s per 100,000 conversations to pickle across processes and ~10 s to convert
    to Arrow; arrays are copied as bytes.
    """

    ids: np.ndarray  # every sample's input ids, one after the other
    labels: np.ndarray
    lengths: np.ndarray  # per sample
    trained: np.ndarray  # per sample: positions that carry a label
    truncated: int  # samples cut to max_seq_len
    split_records: int = 0  # records that became one sample per trained turn
    split_extra_tokens: int = 0  # tokens those splits added over one sample each
    reasoning: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # every sample's ranges
    reasoning_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # per sample

    @classmethod
    def of(cls, records: list[list[Encoded]]) -> EncodedChunk:
        """Pack the encodings of consecutive records."""
        encoded = [e for record in records for e in record]
        splits = [e.split for e in encoded if e.split is not None]
        n = len(encoded)
        lengths = np.fromiter((len(e.input_ids) for e in encoded), np.int32, n)
        total = int(lengths.sum())
        flat = itertools.chain.from_iterable
        return cls(
            np.fromiter(flat(e.input_ids for e in encoded), np.int32, total),
            np.fromiter(flat(e.labels for e in encoded), np.int32, total),
            lengths,
            np.fromiter((e.n_trained for e in encoded), np.int32, n),
            sum(e.truncated for e in encoded),
            len(splits),
            sum(extra for _, extra in splits),
            np.fromiter(flat(e.reasoning for e in encoded), np.int32),
            np.fromiter((len(e.reasoning) for e in encoded), np.int32, n),
        )

    def select(self, keep: np.ndarray) -> EncodedChunk:
        """The samples where `keep` is true."""
        per_token = np.repeat(keep, self.lengths)
        return EncodedChunk(
            self.ids[per_token],
            self.labels[per_token],
            self.lengths[keep],
            self.trained[keep],
            self.truncated,
            self.split_records,
            self.split_extra_tokens,
            self.reasoning[np.repeat(keep, self.reasoning_counts)],
            self.reasoning_counts[keep],
        )

    def arrow_columns(self) -> list[pa.Array]:
        """input_ids, labels and length as Arrow columns, without a per-token Python loop."""
        offsets = pa.array(np.concatenate(([0], np.cumsum(self.lengths, dtype=np.int32))), pa.int32())
        thoughts = np.concatenate(([0], np.cumsum(self.reasoning_counts, dtype=np.int32)))
        return [
            pa.ListArray.from_arrays(offsets, pa.array(self.ids, pa.int32())),
            pa.ListArray.from_arrays(offsets, pa.array(self.labels, pa.int32())),
            pa.array(self.lengths, pa.int32()),
            pa.ListArray.from_arrays(pa.array(thoughts, pa.int32()), pa.array(self.reasoning, pa.int32())),
        ]


# the template a forked worker encodes with: inherited from the parent at fork time, never pickled
_worker_template: Template | None = None


def _encode_chunk(chunk: list[Sample]) -> EncodedChunk | None:
    """A worker's job; None when any sample fails, so the parent re-encodes the chunk and raises the real error."""
    try:
        return EncodedChunk.of([_worker_template.encode(s) for s in chunk])  # type: ignore[union-attr]
    except Exception:  # the exception may not survive pickling; the parent reproduces it instead
        return None


def encode_chunks(samples: Iterable[Sample], template: Template) -> Iterator[EncodedChunk]:
    """Encode in order: inline for small inputs, else in forked worker processes; reading stays in this one.

    Reading and validation stay in the calling process, so their errors name file and line as always; the
    workers only run the template (rendering chat templates and tokenising are ~95% of the time).
    """
    global _worker_template
    samples = iter(samples)
    head = list(itertools.islice(samples, PARALLEL_AFTER))
    samples = itertools.chain(head, samples)
    workers = available_cores()
    if len(head) < PARALLEL_AFTER or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        while chunk := list(itertools.islice(samples, _CHUNK)):
            yield EncodedChunk.of([template.encode(s) for s in chunk])
        return
    _worker_template = template
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pending: deque[tuple[list[Sample], Any]] = deque()
            while chunk := list(itertools.islice(samples, _CHUNK)):
                pending.append((chunk, pool.apply_async(_encode_chunk, (chunk,))))
                while len(pending) > 4 * workers:  # bounded look-ahead keeps memory flat
                    yield _collect(*pending.popleft(), template)
            while pending:
                yield _collect(*pending.popleft(), template)
    finally:
        _worker_template = None


def _collect(chunk: list[Sample], result: Any, template: Template) -> EncodedChunk:
    """A chunk's encodings; a failed chunk is encoded again here so its exception is the genuine one."""
    encoded = result.get()
    return encoded if encoded is not None else EncodedChunk.of([template.encode(s) for s in chunk])


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while encoding (forked workers inherit the pause).

    Encoding allocates millions of short lists and creates no reference cycles, yet each collection walks
    every live object: ~10-15% of the encoding time, measured on 10,000 conversations.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _write_arrow(chunks: Iterator[EncodedChunk], target: Path) -> None:
    """Write encoded chunks as an Arrow stream, then move it into place (never a half-written cache)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, _SCHEMA) as writer:
            for chunk in chunks:
                if len(chunk.lengths):
                    writer.write_batch(pa.record_batch(chunk.arrow_columns(), schema=_SCHEMA))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def entry_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    """The cache entry for a key: the Arrow stream of rows and its statistics."""
    return cache_dir / f"{key}.arrow", cache_dir / f"{key}.stats.json"


def load_stats(meta: Path) -> DataStats:
    """The statistics saved beside a cache entry, marked as coming from the cache."""
    stats = DataStats(**json.loads(meta.read_text()))
    stats.cached = True
    return stats


def encode_file(
    path: str | Path,
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    *,
    fmt: str = "auto",
    on_bad_record: str = "error",
    strict_fields: bool = False,
    cache_dir: Path | None = None,
    progress: Any = None,
    on_entry: Callable[[str], None] | None = None,
) -> tuple[datasets.Dataset, DataStats]:
    """The encoded dataset for a file (from the cache when this exact preprocessing ran before) and its stats.

    `progress` is called with the samples kept so far after each encoded chunk; `on_entry` with the cache
    key once the entry is on disk (found or written).
    """
    import datasets

    path = Path(path)
    stats = DataStats(file=str(path))
    check_file(path, "data file")
    settings = {"format": fmt, "on_bad_record": on_bad_record, "strict_fields": strict_fields}
    key = cache_key(path, template, tokenizer, settings)
    base = cache_dir or Path(tempfile.gettempdir()) / "chattune-data"
    arrow, meta = entry_paths(base, key)
    if arrow.is_file() and meta.is_file():
        stats = load_stats(meta)
    else:
        with _collector_paused():
            chunks = _encode_stream(path, template, fmt, on_bad_record, strict_fields, stats, progress)
            _write_arrow(chunks, arrow)
        meta_tmp = meta.with_suffix(".tmp")
        meta_tmp.write_text(json.dumps(asdict(stats) | {"cached": False}))
        os.replace(meta_tmp, meta)
    dataset = datasets.Dataset.from_file(str(arrow))
    if on_entry is not None:  # only an entry that loads is worth pointing at
        on_entry(key)
    return dataset, stats
