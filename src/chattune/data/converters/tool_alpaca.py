"""ToolAlpaca `train_data.json` (a list of APIs with their instances) → conversations with tool calls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chattune.data.converters.base import CONVERTERS, ConvertStats
from chattune.data.readers import iter_records, value_problem
from chattune.errors import DataFormatError


class _Bad(Exception):
    """One broken instance: a reason and the field it concerns."""

    def __init__(self, reason: str, field: str):
        super().__init__(reason)
        self.reason, self.field = reason, field


def _str(obj: dict[str, Any], key: str, path: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _Bad(
            "missing" if value is None else f"expected a string, got {type(value).__name__}", path + key
        )
    return value


def _thought(text: str) -> str:
    """The model's reasoning before the action it picks: the text before 'Action:', stripped."""
    return text.split("Action:", 1)[0].strip()


def _instance(inst: Any, tools: list[str], path: str) -> dict[str, Any]:
    """One instance as a conversation; raises _Bad naming the field when its shape is wrong."""
    if not isinstance(inst, dict):
        raise _Bad(f"expected an object, got {type(inst).__name__}", path)
    p = path + "."
    messages: list[dict[str, Any]] = [{"role": "user", "content": _str(inst, "input", p)}]
    steps = inst.get("intermediate_steps")
    if not isinstance(steps, list):
        raise _Bad("expected a list of steps" if steps is not None else "missing", p + "intermediate_steps")
    for k, step in enumerate(steps):
        sp = f"{p}intermediate_steps[{k}]"
        # Each step is [[action, action_input_json, thought], observation].
        if not (
            isinstance(step, list) and len(step) == 2 and isinstance(step[0], list) and len(step[0]) == 3
        ):
            raise _Bad("expected [[action, action input, thought], observation]", sp)
        (action, action_input, thought), observation = step
        for value, name in (
            (action, "[0][0]"),
            (action_input, "[0][1]"),
            (thought, "[0][2]"),
            (observation, "[1]"),
        ):
            if not isinstance(value, str):
                raise _Bad(f"expected a string, got {type(value).__name__}", sp + name)
        if not action.strip():
            raise _Bad("empty action name", sp + "[0][0]")
        try:
            parameters = json.loads(action_input)
        except json.JSONDecodeError as e:
            raise _Bad(f"action input is not valid JSON: {e.msg}", sp + "[0][1]") from None
        except RecursionError:
            raise _Bad("action input is JSON nested too deeply", sp + "[0][1]") from None
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise _Bad(f"action input is not readable JSON: {e}", sp + "[0][1]") from None
        if problem := value_problem(parameters):  # too deep for templates, or a lone surrogate
            raise _Bad(problem[0], sp + "[0][1]")
        if not isinstance(parameters, dict):
            raise _Bad(f"action input must be a JSON object, got {type(parameters).__name__}", sp + "[0][1]")
        messages.append({"role": "assistant", "content": _thought(thought)})
        messages.append(
            {"role": "tool", "name": action, "parameters": parameters, "observation": observation}
        )
    final = _str(inst, "Final Thought", p) + "\n" + _str(inst, "output", p)
    messages.append({"role": "assistant", "content": final})
    return {"tools": tools, "conversations": messages}


@CONVERTERS.register("tool-alpaca")
def convert_tool_alpaca(source: Path, stats: ConvertStats) -> Iterator[dict[str, Any]]:
    """Each API's instances → one conversation each, the API's NLDocumentation as its tool; broken ones skipped."""
    for item in iter_records(source):
        # Unreadable JSON hides how many instances are lost, so it stops the conversion instead of skipping.
        if isinstance(item, DataFormatError):
            raise item
        where = {"file": item.file, "line": item.line, "item": item.extra.get("item")}
        api = item.value
        if not isinstance(api, dict) or not isinstance(api.get("Instances"), list):
            stats.read += 1  # nothing tells how many instances it held: count the API as one record
            reason = "expected an object" if not isinstance(api, dict) else "expected a list of instances"
            stats.skip(
                DataFormatError(reason, field=None if not isinstance(api, dict) else "Instances", **where)
            )
            continue
        doc = api.get("NLDocumentation")
        for j, inst in enumerate(api["Instances"]):
            stats.read += 1
            try:
                if not isinstance(doc, str):
                    raise _Bad("missing" if doc is None else "expected a string", "NLDocumentation")
                record = _instance(inst, [doc], f"Instances[{j}]")
            except _Bad as bad:
                stats.skip(DataFormatError(bad.reason, field=bad.field, **where))
                continue
            yield record
