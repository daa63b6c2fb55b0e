"""Write the quick-start demo data: a made-up kite shop whose assistant answers in one JSON shape.

Every product question is answered as
    {"product": ..., "sku": ..., "price_eur": ..., "in_stock": ..., "answer": "<one short sentence>"}
A base chat model answers in free prose and does not know this catalogue, so after a few minutes of
LoRA tuning both the shape and the facts show the effect. All content is original (written for
chattune) and deterministic: run `python examples/quickstart/make_data.py` to rewrite the files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SEED = 20240611
SYSTEM = "You are the Northwind Kites & Gear shop assistant. Answer product questions in JSON."

# name, sku, price in EUR, colours, in stock, one-line feature ("The <name> is <feature>.")
Product = tuple[str, str, float, list[str], bool, str]
CATALOGUE: list[Product] = [
    ("Skylark 120", "NK-120", 49.0, ["red", "blue", "yellow"], True, "a 120 cm delta kite for light winds"),
    ("Breeze 90", "NK-090", 29.5, ["green", "orange"], True, "a 90 cm beginner kite for children"),
    ("Storm Line Pro", "NK-310", 189.0, ["black", "red"], False, "a dual-line stunt kite for strong winds"),
    ("Harbour Delta", "NK-150", 64.0, ["blue", "white"], True, "a 150 cm delta that stays steady in gusts"),
    ("Firefly Box", "NK-204", 72.0, ["orange", "yellow"], False, "a box kite with reflective panels for dusk"),
    ("Comet Tail 8", "NK-T08", 12.5, ["red", "purple"], True, "an 8-metre ribbon tail that steadies a kite"),
    ("Glider Reel 200", "NK-R200", 24.0, ["black", "grey"], True, "a hand reel with 200 m of line"),
    ("TwinGrip Handle Set", "NK-H02", 19.0, ["black", "blue"], True, "two padded handles for dual-line kites"),
    ("Flight Bag 45", "NK-B45", 34.0, ["navy", "grey"], True, "a 45 cm bag that holds three folded kites"),
    ("Gale Foil 3", "NK-F03", 249.0, ["teal", "white"], False, "a 3 m² foil power kite for experienced flyers"),
    ("Pocket Sled", "NK-S40", 15.0, ["pink", "green", "yellow"], True, "a frameless sled kite that fits a pocket"),
    ("Sand Stake Duo", "NK-GS2", 9.5, ["silver"], True, "two aluminium stakes that anchor a line in sand"),
]  # fmt: skip
ALL_COLOURS = sorted({c for p in CATALOGUE for c in p[3]})
BY_NAME = {p[0]: p for p in CATALOGUE}

# Question phrasings per intent: train and eval never share one; held-out questions use their own.
QUESTIONS: dict[str, dict[str, list[str]]] = {
    "price": {
        "train": ["How much is the {name}?", "What does the {name} cost?", "Price of the {name}?",
                  "What's the price of the {name}?", "How much do you charge for the {name}?",
                  "What is the price of item {sku}?"],
        "eval": ["Could you tell me what the {name} costs?", "{name}: how much?"],
    },
    "colours": {
        "train": ["What colours does the {name} come in?", "Which colours is the {name} available in?",
                  "What colors can I get the {name} in?", "Colour options for the {name}?",
                  "Does the {name} come in different colours?"],
        "eval": ["Tell me the colour choices for the {name}.", "In what colours do you sell the {name}?"],
    },
    "stock": {
        "train": ["Is the {name} in stock?", "Do you have the {name} in stock?", "Can I buy the {name} now?",
                  "Is the {name} available?", "Is item {sku} in stock?"],
        "eval": ["Are there any {name} left?", "Has the {name} sold out?"],
    },
    "about": {
        "train": ["Tell me about the {name}.", "What is the {name}?", "Can you describe the {name}?",
                  "What's special about the {name}?", "Give me a quick overview of the {name}."],
        "eval": ["I'd like to know more about the {name}.", "What kind of product is the {name}?"],
    },
    "colour_check": {
        "train": ["Do you have the {name} in {colour}?", "Is the {name} available in {colour}?",
                  "Can I get a {colour} {name}?", "Does the {name} come in {colour}?"],
        "eval": ["I want the {name} in {colour}. Possible?", "Is there a {colour} version of the {name}?"],
    },
}  # fmt: skip
# Second-turn questions: about the same product ("it"), or the same intent for another product.
FOLLOW_UPS: dict[str, dict[str, list[str]]] = {
    "train": {"price": ["How much is it?"], "colours": ["Which colours does it come in?"],
              "stock": ["And is it in stock?"], "about": ["What is it exactly?"],
              "other": ["And the {name}?", "What about the {name}?"]},
    "eval": {"price": ["And what does it cost?"], "colours": ["What colours are there?"],
             "stock": ["Can I buy it now?"], "about": ["Tell me more about it."],
             "other": ["Same question for the {name}."]},
}  # fmt: skip
TOOL_QUESTIONS = {
    "train": ["Can you check live stock for the {name}?", "How many {name} units do you have right now?",
              "Please check the warehouse for the {name}.", "Check current stock of the {name}, please."],
    "eval": ["Could you look up the live stock count for the {name}?", "Any {name} left in the warehouse?"],
}  # fmt: skip
TOOLS = [{
    "name": "check_stock",
    "description": "Live stock count for one product, looked up by SKU.",
    "parameters": {"type": "object", "properties": {"sku": {"type": "string"}}, "required": ["sku"]},
}]  # fmt: skip
# (intent, product, question): phrasings that appear in no other file.
HELDOUT = [
    ("price", "Harbour Delta", "I'm on a budget. What would the {name} set me back?"),
    ("colours", "Pocket Sled", "If I order the {name}, which shades can I pick from?"),
    ("stock", "Gale Foil 3", "Could I order a {name} today, or do I have to wait?"),
]


def listing(colours: list[str]) -> str:
    """'red', 'red and blue', 'red, blue and yellow'."""
    return colours[0] if len(colours) == 1 else ", ".join(colours[:-1]) + " and " + colours[-1]


def reply(p: Product, intent: str, colour: str = "", units: int | None = None) -> str:
    """The assistant's answer: the fixed JSON shape with one short sentence."""
    name, sku, price, colours, in_stock, feature = p
    if intent == "price":
        answer = f"The {name} costs {price:.2f} EUR."
    elif intent == "colours":
        answer = f"The {name} comes in {listing(colours)}."
    elif intent == "stock":
        answer = f"The {name} is in stock." if in_stock else f"The {name} is out of stock right now."
    elif intent == "about":
        answer = f"The {name} is {feature}."
    elif intent == "colour_check":
        yes = f"Yes, the {name} comes in {colour}."
        answer = yes if colour in colours else f"Sorry, the {name} only comes in {listing(colours)}."
    else:  # live stock from the tool
        in_stock = bool(units)
        answer = f"We have {units} units of the {name} right now." if units else f"The {name} is sold out."
    shape = {"product": name, "sku": sku, "price_eur": price, "in_stock": in_stock, "answer": answer}
    return json.dumps(shape, ensure_ascii=False)


def ask(rng: random.Random, split: str, p: Product, intent: str, template: str = "") -> tuple[str, str]:
    """A (question, answer) pair for one product and intent, phrased from the split's templates."""
    colour = ""
    if intent == "colour_check":  # half the time a colour the product has, otherwise one it lacks
        colour = rng.choice(p[3] if rng.random() < 0.5 else [c for c in ALL_COLOURS if c not in p[3]])
    question = (template or rng.choice(QUESTIONS[intent][split])).format(name=p[0], sku=p[1], colour=colour)
    return question, reply(p, intent, colour)


def record(*turns: dict[str, Any], tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One record: the shared system message, the turns, and the tool list if there is one."""
    conversations = [{"role": "system", "content": SYSTEM}, *turns]
    return {"conversations": conversations, "tools": tools} if tools else {"conversations": conversations}


def single(rng: random.Random, split: str, p: Product, intent: str, template: str = "") -> dict[str, Any]:
    q, a = ask(rng, split, p, intent, template)
    return record({"role": "user", "content": q}, {"role": "assistant", "content": a})


def two_turn(rng: random.Random, split: str) -> dict[str, Any]:
    p = rng.choice(CATALOGUE)
    intent = rng.choice(["price", "colours", "stock", "about"])
    q1, a1 = ask(rng, split, p, intent)
    if rng.random() < 0.5:  # same product, another intent
        intent2 = rng.choice([i for i in ("price", "colours", "stock", "about") if i != intent])
        q2, a2 = rng.choice(FOLLOW_UPS[split][intent2]), reply(p, intent2)
    else:  # another product, same intent
        other = rng.choice([o for o in CATALOGUE if o is not p])
        q2, a2 = rng.choice(FOLLOW_UPS[split]["other"]).format(name=other[0]), reply(other, intent)
    turns = [("user", q1), ("assistant", a1), ("user", q2), ("assistant", a2)]
    return record(*({"role": r, "content": c} for r, c in turns))


def tool_call(rng: random.Random, p: Product, question: str) -> dict[str, Any]:
    units = rng.randint(2, 40) if p[4] else 0
    return record(
        {"role": "user", "content": question.format(name=p[0])},
        {"role": "tool", "name": "check_stock", "parameters": {"sku": p[1]},
         "observation": {"sku": p[1], "in_stock": units > 0, "units": units}},
        {"role": "assistant", "content": reply(p, "live", units=units)},
        tools=TOOLS,
    )  # fmt: skip


def build(rng: random.Random) -> dict[str, list[dict[str, Any]]]:
    """train: each (product, intent) in 2-3 phrasings, 16 two-turn, 16 tool calls; eval likewise, smaller."""
    pairs = [(p, i) for p in CATALOGUE for i in QUESTIONS]
    extra = set(rng.sample(range(len(pairs)), 8))  # these pairs get a third phrasing
    train = [single(rng, "train", p, i, t) for k, (p, i) in enumerate(pairs)
             for t in rng.sample(QUESTIONS[i]["train"], 3 if k in extra else 2)]  # fmt: skip
    train += [two_turn(rng, "train") for _ in range(16)]
    tool_pairs = [(p, t) for p in CATALOGUE for t in TOOL_QUESTIONS["train"]]
    train += [tool_call(rng, p, t) for p, t in rng.sample(tool_pairs, 16)]
    evals = [single(rng, "eval", p, rng.choice(list(QUESTIONS))) for p in CATALOGUE]
    evals += [two_turn(rng, "eval") for _ in range(2)]
    eval_tools = zip(rng.sample(CATALOGUE, 2), TOOL_QUESTIONS["eval"], strict=True)
    evals += [tool_call(rng, p, t) for p, t in eval_tools]
    heldout = [
        record({"role": "user", "content": q.format(name=name)},
               {"role": "assistant", "content": reply(BY_NAME[name], intent)})
        for intent, name, q in HELDOUT
    ]  # fmt: skip
    rng.shuffle(train)
    rng.shuffle(evals)
    return {"train": train, "eval": evals, "heldout": heldout}


def user_texts(records: list[dict[str, Any]]) -> set[str]:
    return {m["content"] for r in records for m in r["conversations"] if m["role"] == "user"}


def main() -> None:
    splits = build(random.Random(SEED))
    train_q = user_texts(splits["train"])
    assert not train_q & user_texts(splits["eval"]), "an eval question also appears in train"
    assert not (train_q | user_texts(splits["eval"])) & user_texts(splits["heldout"]), "held-out leak"
    for name, records in splits.items():
        path = HERE / f"{name}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        print(f"wrote {len(records):4d} records to {path.name}")


if __name__ == "__main__":
    main()
