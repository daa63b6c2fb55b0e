"""Preprocessing speed: `chattune data check` on 100,000 multi-turn conversations, cold and then cached.

The conversations are built from the AdvertiseGen rows in ../shared (Chinese product tags -> ad copy): each has
a system prompt and 1-3 user/assistant turns drawn at random (seed 0); one earlier assistant turn in five
carries `"loss": false`. Both runs are `python -m chattune data check` subprocesses, timed from start to exit
(interpreter start, imports, tokenizer, reading, validation, template, masking, the Arrow cache and the
printout): the first with an empty data cache, the second finding the first's cache.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/seed000-advertisegen/dev.json"
SYSTEM = "你是一名电商文案写手，根据商品标签写一段吸引人的广告文案。"
TARGETS = {"cold": 60.0, "cached": 5.0}


def build_conversations(src: Path, count: int, out: Path, seed: int = 0) -> None:
    """`count` conversations in chattune's canonical JSON lines, turns drawn from the AdvertiseGen rows."""
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    with out.open("w", encoding="utf-8") as f:
        for _ in range(count):
            messages = [{"role": "system", "content": SYSTEM}]
            turns = rng.randint(1, 3)
            for turn, row in enumerate(rng.choices(rows, k=turns)):
                messages.append({"role": "user", "content": row["content"]})
                reply = {"role": "assistant", "content": row["summary"]}
                if turn < turns - 1 and rng.random() < 0.2:
                    reply["loss"] = False
                messages.append(reply)
            f.write(json.dumps({"conversations": messages}, ensure_ascii=False) + "\n")


def timed_check(config: Path, home: Path) -> float:
    """Seconds for one `chattune data check` process; exits with its output when it fails."""
    env = os.environ | {"CHATTUNE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "chattune", "data", "check", str(config), "-n", "1"]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    took = time.perf_counter() - t
    if done.returncode != 0:
        sys.exit(
            f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=100_000)
    p.add_argument("--model", default="smollm2-135m-instruct", help="chattune alias or model dir (tokenizer)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="AdvertiseGen JSON lines")
    p.add_argument("--workdir", type=Path, default=None, help="keep the data and cache here")
    a = p.parse_args()

    from rich.console import Console
    from rich.table import Table

    from chattune.models.load import resolve_path

    keep = a.workdir is not None
    work = (a.workdir or Path(tempfile.mkdtemp(prefix="chattune-prep-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, config, home = work / "conversations.jsonl", work / "config.yaml", work / "home"
    build_conversations(a.data, a.conversations, data)
    config.write_text(f"model: {json.dumps(resolve_path(a.model))}\ntrain_file: {json.dumps(str(data))}\n")
    shutil.rmtree(home / "cache" / "data", ignore_errors=True)  # the cold run starts with no cache

    times = {"cold": timed_check(config, home), "cached": timed_check(config, home)}
    stats = json.loads(next((home / "cache" / "data").glob("*.stats.json")).read_text())

    table = Table(
        title=f"chattune data check: {a.conversations:,} conversations ({data.stat().st_size / 2**20:.0f} MB)"
    )
    for column in ("run", "wall s", "target s", "conversations/s", ""):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, took in times.items():
        ok = "[green]ok[/]" if took < TARGETS[name] else "[red]MISSED[/]"
        table.add_row(name, f"{took:.1f}", f"< {TARGETS[name]:.0f}", f"{a.conversations / took:,.0f}", ok)
    console = Console()
    console.print(table)
    console.print(
        f"samples kept {stats['kept']:,}, tokens {stats['tokens']:,}, trained tokens {stats['trained_tokens']:,}; "
        f"{os.cpu_count()} CPUs visible",
        highlight=False,
    )
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
