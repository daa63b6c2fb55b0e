"""`data check` on an already encoded file: printed from the cache index alone, exactly as the normal path prints."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chattune.cli import app
from chattune.config import TrainConfig
from chattune.data import cache
from chattune.models import load
from chattune.paths import data_cache_home

CONVERSATIONS = [
    [("system", "You are helpful."), ("user", "Hi"), ("assistant", "Hello! How can I help you today?")],
    [("user", "What is the weather in Berlin?"), ("assistant", "It is sunny and 21 degrees.")],
    [
        ("user", "one two three"),
        ("assistant", "four five six"),
        ("user", "seven"),
        ("assistant", "eight nine"),
    ],
]


def _write_data(path: Path, conversations: list[list[tuple[str, str]]]) -> None:
    rows = [{"conversations": [{"role": r, "content": c} for r, c in conv]} for conv in conversations]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture()
def chatml_dir(tmp_path, chatml_tokenizer) -> Path:
    """A tokenizer-only dir (tokenizer.json, tokenizer_config.json, chat template) this test may change."""
    path = tmp_path / "tok"
    chatml_tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def chatglm3_dir(tmp_path, chatglm3_tokenizer_model) -> Path:
    """A bare ChatGLM3 tokenizer dir (tokenizer.model only): our own tokenizer class, the chatglm3 template."""
    path = tmp_path / "glm"
    path.mkdir()
    shutil.copyfile(chatglm3_tokenizer_model, path / "tokenizer.model")
    return path


def _config(tmp_path: Path, tokenizer_dir: Path) -> Path:
    data = tmp_path / "data.jsonl"
    if not data.exists():
        _write_data(data, CONVERSATIONS)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {json.dumps(str(tokenizer_dir))}\ntrain_file: {json.dumps(str(data))}\n")
    return config


class _Loads:
    """Counts real tokenizer loads: the normal path loads one, the cached one must not."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = load.load_tokenizer

        def counted(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(load, "load_tokenizer", counted)


def _check(config: Path, *args: str) -> str:
    result = CliRunner().invoke(app, ["data", "check", str(config), *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def _normal_path(config: Path, *args: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The output of the path that loads the tokenizer, the index ignored (the entry itself is cached)."""
    with monkeypatch.context() as m:
        m.setattr(cache, "lookup", lambda *a, **k: None)
        return _check(config, *args)


@pytest.mark.parametrize("args", [("-n", "2"), ("--json", "-n", "2"), ("--json", "-n", "9"), ("-n", "0")])
def test_cached_check_prints_what_the_normal_path_prints(tmp_path, chatml_dir, monkeypatch, args):
    config = _config(tmp_path, chatml_dir)
    loads = _Loads(monkeypatch)
    first = _check(config, *args)
    assert loads.count == 1
    fast = _check(config, *args)
    assert loads.count == 1, "the second run loaded the tokenizer: the index was not used"
    assert fast == _normal_path(config, *args, monkeypatch=monkeypatch)
    assert loads.count == 2
    if "--json" in args:
        assert fast == first and len(fast.splitlines()) == min(int(args[-1]), len(CONVERSATIONS))
    else:  # the first run encoded the file; every later one says it came from the cache
        assert re.search(r"from cache +│ yes", fast)
        assert fast == re.sub(r"(from cache +│ )no ", r"\1yes", first)
        assert fast.count("Sanity Check >>>") == int(args[-1])


def test_chatglm3_tokenizer_dir(tmp_path, chatglm3_dir, monkeypatch):
    config = _config(tmp_path, chatglm3_dir)
    loads = _Loads(monkeypatch)
    _check(config, "-n", "2")
    fast = _check(config, "-n", "2")
    assert loads.count == 1
    assert fast.startswith("template: chatglm3 ") and "'<|assistant|>':  64796 ->   -100" in fast
    assert fast == _normal_path(config, "-n", "2", monkeypatch=monkeypatch)


def test_changed_tokenizer_files_or_data_are_not_served_from_the_index(tmp_path, chatml_dir, monkeypatch):
    config = _config(tmp_path, chatml_dir)
    cfg = TrainConfig(model=str(chatml_dir), train_file=str(tmp_path / "data.jsonl"))
    loads = _Loads(monkeypatch)
    _check(config)
    probe = cache.probe_key(cfg, cfg.train_file)
    assert probe is not None and loads.count == 1

    tokenizer_config = chatml_dir / "tokenizer_config.json"
    tokenizer_config.write_text(
        json.dumps(json.loads(tokenizer_config.read_text()) | {"model_max_length": 64})
    )
    assert cache.probe_key(cfg, cfg.train_file) != probe
    _check(config)
    assert loads.count == 2  # the changed dir went the normal way (and was indexed anew)
    _check(config)
    assert loads.count == 2

    _write_data(tmp_path / "data.jsonl", [*CONVERSATIONS, CONVERSATIONS[0]])
    out = _check(config)
    assert loads.count == 3 and re.search(r"samples kept +│ 4 ", out) and re.search(r"from cache +│ no ", out)


def test_replaced_files_of_same_size_and_mtime_change_the_probe_and_the_full_key(tmp_path, chatml_dir):
    from transformers import AutoTokenizer

    from chattune.data.encode import cache_key
    from chattune.data.templates import build_template

    cfg = TrainConfig(
        model=str(chatml_dir), train_file=str(_config(tmp_path, chatml_dir).parent / "data.jsonl")
    )
    tokenizer = AutoTokenizer.from_pretrained(chatml_dir)
    template = build_template("auto", tokenizer)

    def full_key() -> str:
        return cache_key(Path(cfg.train_file), template, tokenizer, {})

    for path in (Path(cfg.train_file), chatml_dir / "tokenizer.json"):
        before, before_full = cache.probe_key(cfg, cfg.train_file), full_key()
        st = path.stat()
        replacement = path.with_suffix(".new")
        replacement.write_bytes(path.read_bytes())  # same size; a new inode (as cp -p and rsync -t make)
        os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(replacement, path)
        assert path.stat().st_mtime_ns == st.st_mtime_ns
        assert cache.probe_key(cfg, cfg.train_file) != before
        assert full_key() != before_full


def test_config_fields_the_encoding_depends_on_change_the_probe(tmp_path, chatml_dir):
    data = tmp_path / "data.jsonl"
    _write_data(data, CONVERSATIONS)
    base = TrainConfig(model=str(chatml_dir), train_file=str(data))
    probes = {cache.probe_key(base, str(data))}
    for change in ({"max_seq_len": 64}, {"max_target_len": 7}, {"template": "raw"}, {"on_bad_record": "skip"},
                   {"format": "conversations"}, {"tokenizer": str(chatml_dir)}):  # fmt: skip
        probes.add(cache.probe_key(base.model_copy(update=change), str(data)))
    assert len(probes) == 7 and None not in probes
    # unchanged weights do not matter: a retrained model's dir keeps its index
    (chatml_dir / "model.safetensors").write_bytes(b"weights")
    assert cache.probe_key(base, str(data)) in probes


def test_no_probe_where_the_tokenizer_files_are_not_known(tmp_path, chatml_dir):
    data = tmp_path / "data.jsonl"
    _write_data(data, CONVERSATIONS)
    assert cache.probe_key(TrainConfig(model="someone/some-model"), str(data)) is None  # a hub id
    remote = TrainConfig(model=str(chatml_dir), trust_remote_code=True)
    assert cache.probe_key(remote, str(data)) is None
    assert cache.probe_key(TrainConfig(model=str(chatml_dir)), str(tmp_path / "missing.jsonl")) is None


@pytest.mark.parametrize("damage", ["index", "tokens", "arrow", "stats"])
def test_a_damaged_entry_takes_the_normal_path(tmp_path, chatml_dir, monkeypatch, damage):
    config = _config(tmp_path, chatml_dir)
    loads = _Loads(monkeypatch)
    first = _check(config, "-n", "2")
    cache_dir = data_cache_home()
    (index,) = cache_dir.glob("*.probe.json")
    entry = json.loads(index.read_text())
    target = {
        "index": index,
        "tokens": cache_dir / f"tokens-{entry['tokens']}.json",
        "arrow": cache_dir / f"{entry['key']}.arrow",
        "stats": cache_dir / f"{entry['key']}.stats.json",
    }[damage]
    target.write_bytes(target.read_bytes()[:-5])  # torn
    if damage in ("arrow", "stats"):  # the entry itself is broken: whatever the normal path makes of it
        CliRunner().invoke(app, ["data", "check", str(config), "-n", "2"])
        assert loads.count == 2
        return
    again = _check(config, "-n", "2")
    assert loads.count == 2
    # the entry is intact: the same report, and the index is mended
    assert again == re.sub(r"(from cache +│ )no ", r"\1yes", first)
    assert _check(config, "-n", "2") == again and loads.count == 2


def test_an_id_outside_the_token_table_is_never_guessed():
    table = cache.TokenTable(["a", "b", None])
    assert table.convert_ids_to_tokens([0, 2, 1]) == ["a", None, "b"]
    for bad in (3, -1):
        with pytest.raises(LookupError):
            table.convert_ids_to_tokens([0, bad])


def test_cached_check_imports_no_torch_transformers_or_datasets(tmp_path, chatml_dir):
    config = _config(tmp_path, chatml_dir)
    _check(config)
    code = (
        "import sys\n"
        "from chattune.cli import main\n"
        f"sys.argv = ['chattune', 'data', 'check', {str(config)!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = sorted({'torch', 'transformers', 'datasets'} & set(sys.modules))\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr and "from cache" in proc.stdout


def test_a_training_run_indexes_its_encodings_for_data_check(tmp_path, tiny_model_dir, monkeypatch):
    from rich.console import Console

    from chattune.config import build_config
    from chattune.train.run import run_training

    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    _write_data(train, CONVERSATIONS)
    _write_data(evals, CONVERSATIONS[:1])
    settings = {"model": str(tiny_model_dir), "train_file": str(train), "eval_file": str(evals)}
    settings |= {"output_dir": str(tmp_path / "out"), "max_steps": 1, "batch_size": 1, "precision": "fp32"}
    run_training(build_config(settings | {"num_threads": 1}), console=Console(file=io.StringIO()))
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(settings))
    loads = _Loads(monkeypatch)
    for split in ("train", "eval"):
        assert re.search(r"from cache +│ yes", _check(config, "--split", split))
    assert loads.count == 0, "data check loaded the tokenizer: training did not index its encodings"
