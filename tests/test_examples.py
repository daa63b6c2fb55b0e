"""Every shipped example config validates, and the quick-start data reads cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest

from chattune.config import TrainConfig, load_config
from chattune.data.formats import read_samples

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_validates(path):
    if path.name.endswith("-mapping.yaml"):
        pytest.skip("a CSV mapping, not a run config")
    cfg = load_config(path, ["model=smollm2-135m-instruct"])
    assert isinstance(cfg, TrainConfig) and cfg.train_file


def test_quickstart_data_reads_cleanly():
    for name in ("train", "eval", "heldout"):
        samples = list(read_samples(EXAMPLES / "quickstart" / f"{name}.jsonl"))
        assert samples, name
