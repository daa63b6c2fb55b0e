"""Bad input as a user meets it: each case runs `python -m chattune` and must fail in one clear paragraph.

Exit code non-zero, the message on stderr naming the file (and line and field where they apply), and no
Python traceback anywhere. One subprocess per case (each costs a few seconds of start-up), so the cases are
the distinct paths through the CLI: `data check` reading data, `train`/`data check` reading configs, and
`data convert` reading CSV, AdvertiseGen and ToolAlpaca files.
"""

from __future__ import annotations

import json

import pytest

GOOD = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
MAPPING = "messages:\n  - role: user\n    content: '{q}'\n  - role: assistant\n    content: '{a}'\n"

# name → bytes: the bad files the cases below point at
FILES: dict[str, bytes] = {
    "good.jsonl": (json.dumps(GOOD) + "\n").encode(),
    "gbk.jsonl": (
        json.dumps(GOOD) + "\n" + json.dumps(GOOD, ensure_ascii=False).replace("Hi", "你好") + "\n"
    ).encode("gbk"),
    "utf16.jsonl": (json.dumps(GOOD) + "\n").encode("utf-16"),
    "deep.jsonl": (json.dumps(GOOD) + "\n" + "[" * 10_000 + "]" * 10_000 + "\n").encode(),
    "number.jsonl": json.dumps(
        {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 42}]}
    ).encode(),
    "wrong-types.yaml": b"model: x\ntrain_file: good.jsonl\nbatch_size: many\nepochs: yes\nlerning_rate: 1\n",
    "garbage.yaml": bytes(range(256)) * 4,
    "map.yaml": MAPPING.encode(),
    "missing-column.csv": b"q,b\n1,2\n",
    "gbk.csv": "q,a\n1,2\n你好,3\n".encode("gbk"),
    "empty.json": b"",
    "truncated.json": b'[{"NLDocumentation": "d", "Instances": []},\n{"NLDocumentation": "d", "Inst',
}


@pytest.fixture()
def workdir(tmp_path, tiny_model_dir):
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "run.yaml").write_text(f"model: {tiny_model_dir}\ntrain_file: good.jsonl\n")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        # data files, read by `data check` (the tiny tokenizer is all it loads)
        (["data", "check", "run.yaml", "train_file=gbk.jsonl"], ["gbk.jsonl:2", "UTF-8"]),
        (["data", "check", "run.yaml", "train_file=utf16.jsonl"], ["utf16.jsonl:1", "UTF-16"]),
        (["data", "check", "run.yaml", "train_file=deep.jsonl"], ["deep.jsonl:2", "nested"]),
        (
            ["data", "check", "run.yaml", "train_file=number.jsonl"],
            ["number.jsonl:1", "field 'conversations[1].content'", "expected a string, got int"],
        ),
        (["data", "check", "run.yaml", "train_file=missing.jsonl"], ["missing.jsonl", "not found"]),
        (["data", "check", "run.yaml", "train_file=folder.jsonl"], ["folder.jsonl"]),
        # configs
        (
            ["train", "wrong-types.yaml"],
            [
                "wrong-types.yaml",
                "line 3: 'batch_size'",
                "line 4: 'epochs' must be a number",
                "line 5: unknown key 'lerning_rate'",
                "Did you mean 'learning_rate'",
            ],
        ),
        (["data", "check", "garbage.yaml"], ["garbage.yaml", "not UTF-8"]),
        (["data", "check", "folder.jsonl"], ["folder.jsonl", "is a folder"]),
        # converters
        (
            ["data", "convert", "csv", "missing-column.csv", "--mapping", "map.yaml", "-o", "out.jsonl"],
            ["missing-column.csv", "map.yaml", "column(s) a"],
        ),
        (
            ["data", "convert", "csv", "gbk.csv", "--mapping", "map.yaml", "-o", "out.jsonl"],
            ["gbk.csv:3", "UTF-8"],
        ),
        (["data", "convert", "advertise-gen", "empty.json", "-o", "out.jsonl"], ["empty.json", "no records"]),
        (
            ["data", "convert", "tool-alpaca", "truncated.json", "-o", "out.jsonl"],
            ["truncated.json:2", "broken JSON"],
        ),
        (["data", "convert", "alpaca", "folder.jsonl", "-o", "out.jsonl"], ["folder.jsonl", "is a folder"]),
    ],
    ids=[
        "gbk",
        "utf16",
        "deep",
        "number-for-string",
        "missing-file",
        "folder-as-data",
        "config-types",
        "config-binary",
        "config-folder",
        "csv-missing-column",
        "csv-gbk",
        "advertise-gen-empty",
        "tool-alpaca-truncated",
        "convert-folder",
    ],
)
def test_bad_input_fails_in_one_clear_paragraph(workdir, run_cli, args, needles):
    proc = run_cli(*args, cwd=workdir)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert "Error:" in proc.stderr, proc.stderr
    flat = " ".join(proc.stderr.split())  # the console may wrap a long paragraph
    for needle in needles:
        assert needle in flat, proc.stderr
    assert not (workdir / "out.jsonl").exists()  # a failed conversion leaves no output behind
