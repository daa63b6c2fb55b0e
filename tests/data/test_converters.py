"""Converters: exact output on hand-made fixtures, counts on the real AdvertiseGen and Pokemon files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chattune.data.converters import CONVERTERS, ConvertStats, converter_options, run_converter
from chattune.errors import ConfigError, DataFormatError

ROOT = Path(__file__).resolve().parents[2]
SHARED = (ROOT / "../shared/data").resolve()
ADVERTISEGEN = SHARED / "seed000-advertisegen/dev.json"
POKEMON = SHARED / "seed002-pokemon/data.csv"
POKEMON_MAPPING = ROOT / "examples/pokemon.csv-mapping.yaml"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding, newline="")
    return path


# ---------------------------------------------------------------- registry and runner


def test_registry_names_and_options():
    assert set(CONVERTERS.names()) == {
        "tool-alpaca", "advertise-gen", "csv", "alpaca", "sharegpt", "openai", "context-target",
    }  # fmt: skip
    assert converter_options("csv") == ["mapping", "delimiter"]
    assert converter_options("advertise-gen") == ["to"]


def test_unknown_converter_and_option_are_config_errors(tmp_path):
    src = write(tmp_path / "in.json", '{"content": "a", "summary": "b"}\n')
    with pytest.raises(ConfigError, match="Did you mean 'advertise-gen'"):
        run_converter("advertisegen", src, tmp_path / "out.jsonl")
    with pytest.raises(ConfigError, match=r"no option mapping .*options: to"):
        run_converter("advertise-gen", src, tmp_path / "out.jsonl", mapping="x.yaml")
    with pytest.raises(ConfigError, match="to must be one of prompt_response, conversations"):
        run_converter("advertise-gen", src, tmp_path / "out.jsonl", to="chat")
    with pytest.raises(DataFormatError, match=r"missing\.json: file not found"):
        run_converter("advertise-gen", tmp_path / "missing.json", tmp_path / "out.jsonl")
    with pytest.raises(ConfigError, match="not the input"):
        run_converter("advertise-gen", src, src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json"]


def test_failure_midway_leaves_previous_output_and_no_temp_file(tmp_path):
    out = write(tmp_path / "out.jsonl", "previous\n")
    # Two good APIs, then broken JSON: records are written to the temp file before the error.
    good = {
        "NLDocumentation": "d",
        "Instances": [{"input": "i", "output": "o", "Final Thought": "f", "intermediate_steps": []}],
    }
    src = write(
        tmp_path / "train_data.json", "[\n" + json.dumps(good) + ",\n" + json.dumps(good) + ',\n{"NLDoc\n'
    )
    with pytest.raises(DataFormatError, match="broken JSON"):
        run_converter("tool-alpaca", src, out)
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "train_data.json"]


def test_output_folder_is_created_and_overwritten_atomically(tmp_path):
    src = write(tmp_path / "in.json", '{"content": "甲", "summary": "乙"}\n')
    out = tmp_path / "new" / "out.jsonl"
    run_converter("advertise-gen", src, out)
    write(src, '{"content": "丙", "summary": "丁"}\n')
    stats = run_converter("advertise-gen", src, out)
    assert stats == ConvertStats(read=1, written=1, skipped=0)
    assert out.read_text(encoding="utf-8") == '{"prompt": "丙", "response": "丁"}\n'  # ensure_ascii=False
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]


# ---------------------------------------------------------------- tool-alpaca


def _step(action: str, action_input: str, thought: str, observation: str) -> list:
    return [[action, action_input, thought], observation]


TOOL_ALPACA = [
    {
        "Name": "Weather",
        "NLDocumentation": "getWeather: current weather. Parameters: {\"city\": \"Required. string.\"}",
        "Instances": [
            {  # two steps; the second thought has no "Action:" line
                "input": "Weather in Paris and Rome?",
                "output": "Paris 20°C, Rome 25°C.",
                "Final Thought": "I have both temperatures.",
                "intermediate_steps": [
                    _step("getWeather", '{"city": "Paris"}',
                          "I need Paris first.\nAction: getWeather\nAction Input: {\"city\": \"Paris\"}",
                          "Status Code: 200. Response: {\"temp\": 20}"),
                    _step("getWeather", '{"city": "Rome"}', "  Now Rome.  ", "Status Code: 200. Response: {\"temp\": 25}"),
                ],
            },
            {  # broken: the action input is not JSON
                "input": "Weather in Oslo?",
                "output": "?",
                "Final Thought": "?",
                "intermediate_steps": [_step("getWeather", "{city: Oslo}", "Action: getWeather", "")],
            },
        ],
    },
    {
        "Name": "Jokes",
        "NLDocumentation": "getJoke: a random joke.",
        "Instances": [
            {"input": "Tell me a joke.", "output": "Why did...", "Final Thought": "Got one.",
             "intermediate_steps": [_step("getJoke", "{}", "Thought: fetch a joke.\nAction: getJoke\nAction Input: {}", "{\"joke\": \"Why did...\"}")]},
            {"input": "Another!", "output": "No.", "intermediate_steps": []},  # broken: no Final Thought
            {"input": "Hi", "output": "Hello.", "Final Thought": "No tool needed.", "intermediate_steps": []},
            {"input": "x", "output": "y", "Final Thought": "z", "intermediate_steps": [[["getJoke", "{}", "t"]]]},  # broken shape
            {"input": "x", "output": "y", "Final Thought": "z", "intermediate_steps": [_step("getJoke", "[1]", "t", "o")]},  # not an object
        ],
    },
]  # fmt: skip


def test_tool_alpaca_exact_output(tmp_path):
    # One API per line, so each API's line number is known: API i starts on line i + 2.
    src = write(
        tmp_path / "train_data.json", "[\n" + ",\n".join(json.dumps(a) for a in TOOL_ALPACA) + "\n]\n"
    )
    out = tmp_path / "out.jsonl"
    stats = run_converter("tool-alpaca", src, out)
    weather, jokes = [TOOL_ALPACA[0]["NLDocumentation"]], [TOOL_ALPACA[1]["NLDocumentation"]]
    assert read_jsonl(out) == [
        {"tools": weather, "conversations": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "I need Paris first."},
            {"role": "tool", "name": "getWeather", "parameters": {"city": "Paris"},
             "observation": "Status Code: 200. Response: {\"temp\": 20}"},
            {"role": "assistant", "content": "Now Rome."},
            {"role": "tool", "name": "getWeather", "parameters": {"city": "Rome"},
             "observation": "Status Code: 200. Response: {\"temp\": 25}"},
            {"role": "assistant", "content": "I have both temperatures.\nParis 20°C, Rome 25°C."},
        ]},
        {"tools": jokes, "conversations": [
            {"role": "user", "content": "Tell me a joke."},
            {"role": "assistant", "content": "Thought: fetch a joke."},
            {"role": "tool", "name": "getJoke", "parameters": {}, "observation": "{\"joke\": \"Why did...\"}"},
            {"role": "assistant", "content": "Got one.\nWhy did..."},
        ]},
        {"tools": jokes, "conversations": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "No tool needed.\nHello."},
        ]},
    ]  # fmt: skip
    f = str(src)
    assert stats == ConvertStats(
        read=7,
        written=3,
        skipped=4,
        skipped_examples=[
            f"{f}:2 (item 0): field 'Instances[1].intermediate_steps[0][0][1]': "
            "action input is not valid JSON: Expecting property name enclosed in double quotes",
            f"{f}:3 (item 1): field 'Instances[1].Final Thought': missing",
            f"{f}:3 (item 1): field 'Instances[3].intermediate_steps[0]': "
            "expected [[action, action input, thought], observation]",
            f"{f}:3 (item 1): field 'Instances[4].intermediate_steps[0][0][1]': action input must be a JSON object, got list",
        ],
    )


def test_tool_alpaca_broken_api_is_counted(tmp_path):
    apis = [{"NLDocumentation": "d", "Instances": "oops"}, {"Instances": [{"input": "i"}]}]
    src = write(tmp_path / "t.json", json.dumps(apis))
    stats = run_converter("tool-alpaca", src, tmp_path / "out.jsonl")
    assert (stats.read, stats.written, stats.skipped) == (2, 0, 2)
    assert stats.skipped_examples[0].endswith("(item 0): field 'Instances': expected a list of instances")
    assert stats.skipped_examples[1].endswith("(item 1): field 'NLDocumentation': missing")


# ---------------------------------------------------------------- advertise-gen

ADVERTISE_LINES = "\n".join([
    '{"content": "类型#上衣*颜色#白色", "summary": "简约的白色上衣。"}',
    '{"content": "类型#裙", "summary": 3}',
    '{"content": "类型#裤"',
    "",
    '{"summary": "没有 content"}',
    '["not", "an", "object"]',
    '{"content": "类型#鞋", "summary": "  "}',
    '{"content": "类型#帽", "summary": "一顶帽子。"}',
]) + "\n"  # fmt: skip


def test_advertise_gen_pairs_and_skips_with_line_numbers(tmp_path):
    src = write(tmp_path / "dev.json", "\ufeff" + ADVERTISE_LINES)
    out = tmp_path / "out.jsonl"
    stats = run_converter("advertise-gen", src, out)
    assert read_jsonl(out) == [
        {"prompt": "类型#上衣*颜色#白色", "response": "简约的白色上衣。"},
        {"prompt": "类型#帽", "response": "一顶帽子。"},
    ]
    f = str(src)
    assert (stats.read, stats.written, stats.skipped) == (7, 2, 5)  # the blank line is not a record
    examples = stats.skipped_examples
    assert examples[0] == f"{f}:2: field 'summary': expected a string, got int"
    assert examples[1].startswith(f"{f}:3: broken JSON")  # the rest is the shared JSON reader's wording
    assert examples[2:] == [
        f"{f}:5: field 'content': missing",
        f"{f}:6: expected a JSON object, got list",
        f"{f}:7: field 'summary': empty",
    ]


def test_advertise_gen_to_conversations(tmp_path):
    src = write(tmp_path / "dev.json", ADVERTISE_LINES)
    out = tmp_path / "out.jsonl"
    run_converter("advertise-gen", src, out, to="conversations")
    assert read_jsonl(out)[1] == {
        "conversations": [
            {"role": "user", "content": "类型#帽"},
            {"role": "assistant", "content": "一顶帽子。"},
        ]
    }


@pytest.mark.skipif(
    not ADVERTISEGEN.is_file(), reason=f"real AdvertiseGen data not present at {ADVERTISEGEN}"
)
def test_advertise_gen_real_file(tmp_path):
    out = tmp_path / "out.jsonl"
    stats = run_converter("advertise-gen", ADVERTISEGEN, out, to="conversations")
    assert (stats.read, stats.written, stats.skipped) == (1070, 1070, 0)
    first = read_jsonl(out)[0]["conversations"]
    assert first[0] == {
        "role": "user",
        "content": "类型#上衣*材质#牛仔布*颜色#白色*风格#简约*图案#刺绣*衣样式#外套*衣款式#破洞",
    }
    assert first[1]["content"].startswith("简约而不简单的牛仔外套")


# ---------------------------------------------------------------- csv


def test_example_mapping_is_the_pokemon_tutorials():
    from chattune.data.converters.csv_mapping import load_mapping

    templates = load_mapping(POKEMON_MAPPING)
    assert [t.role for t in templates] == ["system", "user", "assistant", "user", "assistant"]
    row = {"姓名": "N", "属性": "A", "弱点": "W", "特征": "F", "数据": "D"}
    assert [t.render(row) for t in templates] == [
        "描述一个宝可梦：N。", "它有什么特性和弱点？", "N的属性是A，弱点是W，特性是F。", "有更多的信息吗？", "D",
    ]  # fmt: skip


@pytest.mark.skipif(not POKEMON.is_file(), reason=f"real Pokemon data not present at {POKEMON}")
def test_csv_real_pokemon_file(tmp_path):
    out = tmp_path / "out.jsonl"
    stats = run_converter("csv", POKEMON, out, mapping=POKEMON_MAPPING)
    assert stats == ConvertStats(read=1050, written=1050, skipped=0)
    records = read_jsonl(out)
    assert len(records) == 1050
    assert (
        records[0]
        == {
            "conversations": [
                {"role": "system", "content": "描述一个宝可梦：妙蛙种子。"},
                {"role": "user", "content": "它有什么特性和弱点？"},
                {"role": "assistant", "content": "妙蛙种子的属性是草毒，弱点是火冰，特性是茂盛。"},
                {"role": "user", "content": "有更多的信息吗？"},
                {
                    "role": "assistant",
                    "content": "罗盘宝可梦会看到它在太阳底下睡午觉的样子。在沐浴了充足的阳光后，"
                    "它背上的种子就会茁壮成长。ＨＰ减少的时候，草属的招式威\uf98a会提高。",  # sic: U+F98A, as in the file
                },
            ]
        }
    )


MAPPING = """\
messages:
  - {role: user, content: "Describe {name} as JSON {{\\"k\\": 1}}", loss: false}
  - {role: assistant, content: "{name}: {notes}"}
"""


def test_csv_bom_quoted_newlines_braces_loss_and_skips(tmp_path):
    mapping = write(tmp_path / "m.yaml", MAPPING)
    rows = [
        "name,notes,unused",  # line 1
        'Pika,"line one\nline two",',  # lines 2-3: a quoted cell with a newline
        "Bulba,too few",  # line 4
        "Char,hot,x,extra",  # line 5
        ",empty name,x",  # line 6
        "",  # line 7: blank, not a row
        'Squirt,"{not a placeholder}",',  # line 8
    ]
    src = write(tmp_path / "p.csv", "\ufeff" + "\r\n".join(rows) + "\r\n")
    out = tmp_path / "out.jsonl"
    stats = run_converter("csv", src, out, mapping=mapping)
    assert read_jsonl(out) == [
        {"conversations": [
            {"role": "user", "content": 'Describe Pika as JSON {"k": 1}', "loss": False},
            {"role": "assistant", "content": "Pika: line one\nline two"},
        ]},
        {"conversations": [
            {"role": "user", "content": 'Describe Squirt as JSON {"k": 1}', "loss": False},
            {"role": "assistant", "content": "Squirt: {not a placeholder}"},  # cell text is never re-formatted
        ]},
    ]  # fmt: skip
    f = str(src)
    assert stats == ConvertStats(
        read=5,
        written=2,
        skipped=3,
        skipped_examples=[
            f"{f}:4: has 2 cells, the header has 3",
            f"{f}:5: has 4 cells, the header has 3",
            f"{f}:6: field 'name': empty cell",
        ],
    )


def test_csv_missing_column_names_mapping_column_and_columns(tmp_path):
    mapping = write(
        tmp_path / "m.yaml",
        'messages:\n  - {role: user, content: "{name}"}\n  - {role: assistant, content: "{weight}"}\n',
    )
    src = write(tmp_path / "p.csv", "name,notes\na,b\n")
    with pytest.raises(ConfigError) as e:
        run_converter("csv", src, tmp_path / "out.jsonl", mapping=mapping)
    assert (
        str(e.value)
        == f"mapping file {mapping} uses column(s) weight that {src} does not have (its columns: name, notes)"
    )
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('"{name"', "messages\\[1\\].content: .*literal brace"),
        ('"{name:>5}"', "bare column names"),
        ('"{}"', "empty placeholder"),
    ],
)
def test_csv_bad_templates(tmp_path, content, match):
    mapping = write(
        tmp_path / "m.yaml",
        f"messages:\n  - {{role: user, content: hi}}\n  - {{role: assistant, content: {content}}}\n",
    )
    src = write(tmp_path / "p.csv", "name\na\n")
    with pytest.raises(ConfigError, match=match):
        run_converter("csv", src, tmp_path / "out.jsonl", mapping=mapping)


@pytest.mark.parametrize(
    ("yaml_text", "match"),
    [
        ("messages: []", "expected `messages:`"),
        ("messages:\n  - {role: bot, content: x}", "role must be one of"),
        ("messages:\n  - {role: user, content: x}", "no trained message"),
        ("messages:\n  - {role: assistant, content: x, weight: 2}", "unknown key"),
        ("messages:\n  - {role: assistant, content: x, loss: maybe}", "loss must be true or false"),
        (
            "messages:\n  - {role: user, content: x}\n  - {role: system, content: y}",
            "system message can only come first",
        ),
    ],
)
def test_csv_bad_mappings(tmp_path, yaml_text, match):
    mapping = write(tmp_path / "m.yaml", yaml_text + "\n")
    src = write(tmp_path / "p.csv", "name\na\n")
    with pytest.raises(ConfigError, match=match):
        run_converter("csv", src, tmp_path / "out.jsonl", mapping=mapping)


def test_csv_needs_mapping_and_reports_broken_files(tmp_path):
    src = write(tmp_path / "p.csv", "name\n")
    with pytest.raises(ConfigError, match="needs mapping=PATH"):
        run_converter("csv", src, tmp_path / "out.jsonl")
    mapping = write(tmp_path / "m.yaml", "messages:\n  - {role: assistant, content: '{name}'}\n")
    with pytest.raises(DataFormatError, match="empty file"):
        run_converter("csv", write(tmp_path / "e.csv", ""), tmp_path / "out.jsonl", mapping=mapping)
    gbk = tmp_path / "g.csv"
    gbk.write_bytes("name\n妙蛙种子\n".encode("gbk"))
    with pytest.raises(DataFormatError, match="not valid UTF-8"):
        run_converter("csv", gbk, tmp_path / "out.jsonl", mapping=mapping)
    tsv = write(tmp_path / "t.tsv", "name\tx\na\tb\n")
    assert run_converter("csv", tsv, tmp_path / "out.jsonl", mapping=mapping, delimiter="\t").written == 1


# ---------------------------------------------------------------- alpaca, sharegpt, openai, context-target


def _formats_ready() -> bool:
    try:
        from chattune.data.formats import read_samples, sample_to_record  # noqa: F401
    except ImportError:
        return False
    return True


formats_ready = pytest.mark.skipif(
    not _formats_ready(), reason="formats not ready: chattune.data.formats is missing"
)


@formats_ready
@pytest.mark.parametrize(
    ("kind", "record", "expected"),
    [
        (
            "alpaca",
            {"system": "S", "history": [["q", "a"]], "instruction": "Translate", "input": "猫", "output": "cat"},
            [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
             {"role": "user", "content": "Translate\n猫"}, {"role": "assistant", "content": "cat"}],
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        ),
        (
            "openai",
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]},
            [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        ),
        (
            "context-target",
            {"context": "Instruction: 分类\nAnswer: ", "target": '["体育"]'},
            [{"role": "user", "content": "Instruction: 分类\nAnswer: "}, {"role": "assistant", "content": '["体育"]'}],
        ),
    ],
)  # fmt: skip
def test_format_converters(tmp_path, kind, record, expected):
    src = write(tmp_path / "in.jsonl", json.dumps(record, ensure_ascii=False) + "\n{}\n")
    out = tmp_path / "out.jsonl"
    stats = run_converter(kind, src, out)
    assert read_jsonl(out) == [{"conversations": expected}]
    assert (stats.read, stats.written, stats.skipped) == (2, 1, 1)
    assert stats.skipped_examples[0].startswith(f"{src}:2: ")


@formats_ready
def test_format_converter_keeps_tools_and_tool_calls(tmp_path):
    record = {
        "tools": [{"name": "getWeather"}],
        "messages": [
            {"role": "user", "content": "Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "function": {"name": "getWeather", "arguments": '{"city": "Paris"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "20°C"},
            {"role": "assistant", "content": "20°C in Paris."},
        ],
    }
    src = write(tmp_path / "in.jsonl", json.dumps(record) + "\n")
    out = tmp_path / "out.jsonl"
    run_converter("openai", src, out)
    assert read_jsonl(out) == [
        {
            "conversations": [
                {"role": "user", "content": "Paris?"},
                {
                    "role": "tool",
                    "name": "getWeather",
                    "parameters": {"city": "Paris"},
                    "observation": "20°C",
                },
                {"role": "assistant", "content": "20°C in Paris."},
            ],
            "tools": [{"name": "getWeather"}],
        }
    ]


@formats_ready
def test_outputs_read_back_as_canonical_data(tmp_path):
    """What the converters write is what `chattune train` reads (format: conversations / prompt_response)."""
    from chattune.data.formats import ReadReport, read_samples

    src = write(tmp_path / "train_data.json", json.dumps(TOOL_ALPACA))
    run_converter("tool-alpaca", src, tmp_path / "tools.jsonl")
    run_converter("advertise-gen", write(tmp_path / "dev.json", ADVERTISE_LINES), tmp_path / "pairs.jsonl")
    run_converter(
        "csv",
        write(tmp_path / "p.csv", "name,notes\na,b\n"),
        tmp_path / "csv.jsonl",
        mapping=write(tmp_path / "m.yaml", MAPPING),
    )
    for name, fmt, n in [
        ("tools", "conversations", 3),
        ("pairs", "prompt_response", 2),
        ("csv", "conversations", 1),
    ]:
        report = ReadReport()
        assert len(list(read_samples(tmp_path / f"{name}.jsonl", report=report))) == n
        assert (report.skipped, report.formats) == (0, {fmt: n})
