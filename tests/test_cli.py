"""The CLI as a user runs it (subprocess): clear one-paragraph errors, non-zero exits, no tracebacks."""

from __future__ import annotations

import json
import subprocess

import pytest


@pytest.fixture()
def workdir(tmp_path, tiny_model_dir):
    (tmp_path / "data.jsonl").write_text(
        json.dumps(
            {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
        )
        + "\n"
    )
    (tmp_path / "run.yaml").write_text(f"model: {tiny_model_dir}\ntrain_file: data.jsonl\n")
    return tmp_path


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_data_check_prints_table_and_stats(workdir, run_cli):
    proc = run_cli("data", "check", "run.yaml", "-n", "1", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "Sanity Check >>>>>>>>>>>>>" in proc.stdout and "<<<<<<<<<<<<< Sanity Check" in proc.stdout
    assert "samples kept" in proc.stdout and "'<|im_end|>':" in proc.stdout


def test_data_check_warns_about_fields_it_does_not_read(workdir, run_cli):
    record = {"id": 7, "conversations": [{"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello", "weight": 0.5}]}  # fmt: skip
    (workdir / "data.jsonl").write_text(json.dumps(record) + "\n")
    proc = run_cli("data", "check", "run.yaml", "-n", "1", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())  # rich wraps long lines
    assert "warning: field 'weight' is not read by this format" in out
    assert "data.jsonl:1: field 'conversations[1].weight'" in out
    assert "weight (1)" in out and "id (1)" in out  # in the statistics too
    strict = run_cli("data", "check", "run.yaml", "strict_fields=true", cwd=workdir)
    assert_clean_failure(strict, "data.jsonl:1", "conversations[1].weight", "strict_fields")


def test_data_check_json_is_pure(workdir, run_cli):
    proc = run_cli("data", "check", "run.yaml", "--json", "-n", "5", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 1 and set(rows[0]) == {"input_ids", "labels"}
    assert len(rows[0]["input_ids"]) == len(rows[0]["labels"])


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["data", "check", "run.yaml", "learning_rat=1"],
            ["unknown key 'learning_rat'", "Did you mean 'learning_rate'"],
        ),
        (["data", "check", "run.yaml", "batch_size=many"], ["'batch_size'"]),
        (["data", "check", "run.yaml", "method=full", "quantization_bit=4"], ["cannot be combined"]),
        (["data", "check", "run.yaml", "train_file=null"], ["train_file"]),
        (["data", "check", "missing.yaml"], ["missing.yaml not found"]),
        (
            ["data", "check", "run.yaml", "train_file=bad.jsonl"],
            ["bad.jsonl:2", "field 'conversations[0].role'"],
        ),
        (["data", "check", "run.yaml", "template=chatglm"], ["Did you mean 'chatglm3'"]),
        (["data", "check", "run.yaml", "model=no-such-model"], ["no-such-model"]),
        (["data", "convert", "advertise-gn", "x.json", "-o", "y.jsonl"], ["Did you mean 'advertise-gen'"]),
    ],
)
def test_bad_input_fails_cleanly(workdir, run_cli, args, needles):
    (workdir / "bad.jsonl").write_text(
        (workdir / "data.jsonl").read_text() + '{"conversations": [{"role": "bot"}]}\n'
    )
    assert_clean_failure(run_cli(*args, cwd=workdir), *needles)


def test_yaml_that_is_not_a_mapping(workdir, run_cli):
    (workdir / "list.yaml").write_text("- a\n- b\n")
    assert_clean_failure(run_cli("data", "check", "list.yaml", cwd=workdir), "mapping")
