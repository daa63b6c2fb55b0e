"""Preprocessing speed: `chattune data check` on 100,000 multi-turn conversations, cold and then cached.

Two sets of 100,000 conversations, both built from the tutorials' data in ../shared with seed 0:
- pokemon: the ChatGLM3 Pokemon tutorial's own multi-turn format, one five-message conversation per table row
  (system, user, assistant, user, assistant), rows drawn with replacement;
- advertisegen: a system prompt and 1-3 user/assistant turns of AdvertiseGen rows (product tags -> ad copy),
  one earlier assistant turn in five with `"loss": false`; about 2.5x the tokens per conversation.
Each run is a `python -m chattune data check` subprocess timed from start to exit (interpreter start, imports,
tokenizer, reading, validation, template, masking, the Arrow cache and the printout): first with an empty
data cache, then finding the first run's cache.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
SOURCES = {
    "pokemon": SHARED / "seed002-pokemon/data.csv",
    "advertisegen": SHARED / "seed000-advertisegen/dev.json",
}
SYSTEM = "你是一名电商文案写手，根据商品标签写一段吸引人的广告文案。"
TARGETS = {"cold": 60.0, "cached": 5.0}


def pokemon_conversations(src: Path, count: int, out: Path, seed: int = 0) -> None:
    """`count` conversations in the Pokemon tutorial's five-message format, table rows drawn at random."""
    with src.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(seed)
    with out.open("w", encoding="utf-8") as f:
        for row in rng.choices(rows, k=count):
            messages = [
                {"role": "system", "content": f"描述一个宝可梦：{row['姓名']}。"},
                {"role": "user", "content": "它有什么特性和弱点？"},
                {
                    "role": "assistant",
                    "content": f"{row['姓名']}的属性是{row['属性']}，弱点是{row['弱点']}，特性是{row['特征']}。",
                },
                {"role": "user", "content": "有更多的信息吗？"},
                {"role": "assistant", "content": row["数据"]},
            ]
            f.write(json.dumps({"conversations": messages}, ensure_ascii=False) + "\n")


def advertisegen_conversations(src: Path, count: int, out: Path, seed: int = 0) -> None:
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


BUILDERS = {"pokemon": pokemon_conversations, "advertisegen": advertisegen_conversations}


def measure(source: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build one set, run data check cold then cached; the times and the cache's statistics."""
    from chattune.models.load import resolve_path

    data, config, home = work / f"{source}.jsonl", work / f"{source}.yaml", work / f"home-{source}"
    BUILDERS[source](SOURCES[source], a.conversations, data)
    config.write_text(f"model: {json.dumps(resolve_path(a.model))}\ntrain_file: {json.dumps(str(data))}\n")
    shutil.rmtree(home / "cache" / "data", ignore_errors=True)  # the cold run starts with no cache
    times = {"cold": timed_check(config, home), "cached": timed_check(config, home)}
    stats = json.loads(next((home / "cache" / "data").glob("*.stats.json")).read_text())
    return {"times": times, "stats": stats, "mb": data.stat().st_size / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=100_000)
    p.add_argument("--model", default="smollm2-135m-instruct", help="chattune alias or model dir (tokenizer)")
    p.add_argument(
        "--sources", default=",".join(SOURCES), help=f"comma-separated subset of {', '.join(SOURCES)}"
    )
    p.add_argument("--workdir", type=Path, default=None, help="keep the data and caches here")
    a = p.parse_args()

    from rich.console import Console
    from rich.table import Table

    sources = [x.strip() for x in a.sources.split(",") if x.strip()]
    if unknown := set(sources) - set(SOURCES):
        p.error(f"unknown sources {sorted(unknown)}; choose from {', '.join(SOURCES)}")
    keep = a.workdir is not None
    work = (a.workdir or Path(tempfile.mkdtemp(prefix="chattune-prep-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = {source: measure(source, a, work) for source in sources}

    table = Table(
        title=f"chattune data check: {a.conversations:,} conversations, {os.cpu_count()} CPUs visible"
    )
    for column in ("set", "MB", "tokens", "run", "wall s", "target s", "tokens/s", ""):
        table.add_column(column, justify="left" if column in ("set", "run") else "right")
    for source, r in results.items():
        tokens = r["stats"]["tokens"]
        for name, took in r["times"].items():
            ok = "[green]ok[/]" if took < TARGETS[name] else "[red]MISSED[/]"
            size = (f"{r['mb']:.0f}", f"{tokens:,}") if name == "cold" else ("", "")
            row = [f"{took:.1f}", f"< {TARGETS[name]:.0f}", f"{tokens / took:,.0f}", ok]
            table.add_row(source if name == "cold" else "", *size, name, *row)
    Console().print(table)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
