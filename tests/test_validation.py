"""The rooms "Output validation" and "Validation types": split_reasoning's answer, find_fences, extract_code,
parse_json_output, check_output and describe_validation, the six validation types of
the README, and original defects 16 and 17. Pure function tests: no server, no store."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import assume, given, settings, strategies as st

import bridge


def answer_of(text: str) -> str:
    """What bridge checks and writes of a model's text: split_reasoning's answer."""
    return bridge.split_reasoning(text)[0]

PROPERTY = settings(max_examples=200, deadline=None)

FENCE = "`" * 3  # written out once so the literals below stay readable

# The validation objects every type is exercised with (the README's validation types).
ALL_VALIDATIONS = [
    {"type": "non_empty"},
    {"type": "json"},
    {"type": "contains_keys", "keys": ["a"]},
    {"type": "syntax_check"},
    {"type": "syntax_check", "language": "python"},
    {"type": "syntax_check", "language": "json"},
    {"type": "syntax_check", "language": "toml"},
    {"type": "json_schema", "schema": {"type": "object"}},
    {"type": "regex", "pattern": "a+"},
]


def clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} chars)"


def fenced(code: str, tag: str = "", before: str = "", after: str = "") -> str:
    """A model reply holding code in one ``` block, with optional prose around it."""
    return f"{before}{FENCE}{tag}\n{code}\n{FENCE}\n{after}"


def invalid(text: str, validation: dict) -> str:
    """Run check_output, demand OutputInvalid, return its message."""
    try:
        artifact = bridge.check_output(text, validation)
    except bridge.OutputInvalid as exc:
        message = str(exc)
    except Exception as exc:  # short report: the inputs below can be 100 000 characters long
        pytest.fail(f"check_output raised {type(exc).__name__} ({clip(str(exc))}), not OutputInvalid, "
                    f"for {validation} on {clip(text)!r}", pytrace=False)
    else:
        pytest.fail(f"check_output passed {clip(text)!r} under {validation} (artifact {clip(artifact)!r})",
                    pytrace=False)
    assert message.strip(), "OutputInvalid must carry a message the model can act on"
    return message


###############################################################################
# split_reasoning's answer (reasoning taken out of what a model said)
###############################################################################

def test_split_reasoning_removes_a_leading_block():
    assert answer_of("<think>let me see</think>The answer is 4.") == "The answer is 4."


def test_split_reasoning_removes_leading_whitespace_and_the_whitespace_after_the_block():
    assert answer_of("\n  <think>hm</think>\n\n  x = 1\n") == "x = 1\n"


def test_split_reasoning_removes_several_leading_blocks():
    text = "<think>one</think>\n<think>two</think>  <think>three</think>\nresult"
    assert answer_of(text) == "result"


def test_split_reasoning_removes_a_multiline_block():
    text = "<think>\nstep 1: read\nstep 2: write </thinking> is not the end\n</think>\n" + fenced("x = 1", "python")
    assert answer_of(text) == fenced("x = 1", "python")


def test_split_reasoning_unclosed_leading_block_swallows_everything_so_non_empty_fails():
    output = answer_of("<think>I keep thinking and never stop ... ```python\nx = 1\n```")
    assert output == ""
    assert "empty" in invalid(output, {"type": "non_empty"})


def test_split_reasoning_leaves_a_think_tag_in_the_middle_alone():
    text = "Use the <think>tag</think> in your prompt."
    assert answer_of(text) == text


def test_split_reasoning_leaves_text_without_think_untouched():
    text = "  plain answer with <b>html</b>  \n"
    assert answer_of(text) == text


def test_split_reasoning_then_check_output_sees_only_the_answer():
    reply = '<think>they want {"wrong": true}</think>\n' + fenced('{"right": 1}', "json")
    artifact = bridge.check_output(answer_of(reply), {"type": "contains_keys", "keys": ["right"]})
    assert json.loads(artifact) == {"right": 1}


###############################################################################
# find_fences
###############################################################################

def test_find_fences_returns_every_block_in_order_with_lowercased_tags():
    text = f"a\n{FENCE}Python\nx = 1\n{FENCE}\nb\n{FENCE}\nplain\n{FENCE}\n~~~TOML\nk = 1\n~~~\n"
    assert bridge.find_fences(text) == [("python", "x = 1"), ("", "plain"), ("toml", "k = 1")]


def test_find_fences_ignores_words_after_the_tag_on_the_opening_line():
    """(original defect 17)"""
    text = f"{FENCE}python  # file: x.py\nx = 1\n{FENCE}\n"
    assert bridge.find_fences(text) == [("python", "x = 1")]


def test_find_fences_accepts_text_before_the_fence_on_the_same_line():
    """(original defect 17)"""
    assert bridge.find_fences(f'Here: {FENCE}json\n{{"a": 1}}\n{FENCE}') == [("json", '{"a": 1}')]


def test_find_fences_unclosed_block_runs_to_the_end():
    assert bridge.find_fences(f"intro\n{FENCE}python\nx = 1\ny = 2\n") == [("python", "x = 1\ny = 2\n")]


def test_find_fences_closing_fence_glued_to_the_last_code_line():
    assert bridge.find_fences(f"{FENCE}python\nx = 1\ny = 2{FENCE}\nbye") == [("python", "x = 1\ny = 2")]


def test_find_fences_tilde_block_may_hold_backtick_fences_and_longer_fences_hold_shorter():
    inner = f"{FENCE}python\nx = 1\n{FENCE}"
    assert bridge.find_fences(f"~~~markdown\n{inner}\n~~~\n") == [("markdown", inner)]
    assert bridge.find_fences(f"````md\n{inner}\n````\n") == [("md", inner)]


def test_find_fences_without_a_fence_is_empty():
    assert bridge.find_fences("no code here, only `inline` and ``double`` ticks") == []


###############################################################################
# extract_code
###############################################################################

def test_extract_code_without_a_fence_is_the_whole_text_stripped():
    assert bridge.extract_code("\n\n  x = 1\n  \n") == "x = 1"


def test_extract_code_drops_the_prose_around_the_fence():
    reply = fenced("def f():\n    return 1", "python", "Sure! Here is the code:\n", "Hope this helps.\n")
    assert bridge.extract_code(reply) == "def f():\n    return 1"


@pytest.mark.parametrize("earlier_tag", ["text", "json", "bash", ""])
def test_extract_code_python_block_wins_over_an_earlier_other_block(earlier_tag):
    reply = fenced("run it like this", earlier_tag) + fenced("x = 1", "python", "and the code:\n")
    assert bridge.extract_code(reply, "python") == "x = 1"


@pytest.mark.parametrize("alias", ["py", "python3", "PYTHON"])
def test_extract_code_python_aliases_count_as_python(alias):
    reply = fenced("ls -l", "sh") + fenced("x = 1", alias)
    assert bridge.extract_code(reply, "python") == "x = 1"


def test_extract_code_untagged_block_wins_over_a_differently_tagged_one():
    reply = fenced("$ python x.py", "console") + fenced("x = 1")
    assert bridge.extract_code(reply, "python") == "x = 1"


def test_extract_code_falls_back_to_the_first_block():
    reply = fenced("first", "text") + fenced("second", "console")
    assert bridge.extract_code(reply, "python") == "first"
    assert bridge.extract_code(reply) == "first"


def test_extract_code_without_language_takes_the_first_block():
    reply = fenced("a = 1", "toml") + fenced("x = 1", "python")
    assert bridge.extract_code(reply) == "a = 1"
    assert bridge.extract_code(reply, "toml") == "a = 1"
    assert bridge.extract_code(reply, "python") == "x = 1"


def test_extract_code_tilde_fences():
    assert bridge.extract_code("Here:\n~~~python\nx = 1\n~~~\ndone") == "x = 1"


def test_extract_code_unclosed_fence_runs_to_the_end():
    assert bridge.extract_code(f"Here:\n{FENCE}python\nx = 1\ny = 2") == "x = 1\ny = 2"


_NO_FENCE_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="`~\n")
_LINE = st.text(alphabet=_NO_FENCE_CHARS, max_size=30)
_PROSE = st.lists(_LINE, max_size=4).map("\n".join)
_CODE = st.lists(_LINE, min_size=1, max_size=8).map("\n".join)


@PROPERTY
@given(code=_CODE, tag=st.sampled_from(["", "json", "python", "py", "toml", "text", "js"]),
       before=_PROSE, after=_PROSE)
def test_extract_code_returns_exactly_the_fenced_code(code, tag, before, after):
    reply = before + "\n" + FENCE + tag + "\n" + code + "\n" + FENCE + "\n" + after
    assert bridge.extract_code(reply) == code
    assert bridge.extract_code(reply, "python") == code   # the only block, whatever its tag


###############################################################################
# parse_json_output
###############################################################################

def test_parse_json_output_whole_text():
    assert bridge.parse_json_output(' {"a": [1, 2]} \n') == {"a": [1, 2]}


def test_parse_json_output_prefers_the_json_block():
    reply = fenced("not json at all", "text") + fenced('{"a": 1}', "json")
    assert bridge.parse_json_output(reply) == {"a": 1}


def test_parse_json_output_finds_json_in_prose():
    assert bridge.parse_json_output('Sure, here it is: {"a": 1} - enjoy!') == {"a": 1}
    assert bridge.parse_json_output("The list:\n[1, 2, 3]\nThat's all.") == [1, 2, 3]


def test_parse_json_output_raises_output_invalid_naming_the_parse_error():
    with pytest.raises(bridge.OutputInvalid, match="not valid JSON"):
        bridge.parse_json_output('{"a": 1,}')


###############################################################################
# check_output: the six types
###############################################################################

# -- non_empty

def test_non_empty_passes_and_returns_the_stripped_text():
    assert bridge.check_output("  Paris is the capital.\n", {"type": "non_empty"}) == "Paris is the capital."


def test_non_empty_returns_the_fenced_code():
    reply = fenced("x = 1", "python", "Here:\n", "Bye.")
    assert bridge.check_output(reply, {"type": "non_empty"}) == "x = 1"


@pytest.mark.parametrize("text", ["", "   ", "\n\t \n"])
def test_non_empty_fails_on_whitespace(text):
    assert "empty" in invalid(text, {"type": "non_empty"})


def test_missing_type_means_non_empty():
    assert bridge.check_output("hello", {}) == "hello"
    invalid("  ", {})


# -- json

@pytest.mark.parametrize("reply", [
    '{"a": 1, "b": [true, null]}',
    fenced('{"a": 1, "b": [true, null]}', "json", "Here you go:\n", "Anything else?"),
    fenced('{"a": 1, "b": [true, null]}', "", "Here you go:\n"),
    'Result: {"a": 1, "b": [true, null]} (as asked)',
])
def test_json_passes_and_returns_the_json_reserialised(reply):
    artifact = bridge.check_output(reply, {"type": "json"})
    assert json.loads(artifact) == {"a": 1, "b": [True, None]}
    assert FENCE not in artifact and "Here" not in artifact


@pytest.mark.parametrize("reply", ["{'a': 1}", '{"a": 1,}', "just words", fenced("{broken", "json"), ""])
def test_json_fails_with_a_message_naming_json(reply):
    assert "JSON" in invalid(reply, {"type": "json"})


# -- contains_keys

def test_contains_keys_passes_when_every_key_is_there():
    artifact = bridge.check_output(fenced('{"name": "x", "age": 3, "extra": 0}', "json"),
                                   {"type": "contains_keys", "keys": ["name", "age"]})
    assert json.loads(artifact) == {"name": "x", "age": 3, "extra": 0}


def test_contains_keys_names_the_missing_keys():
    message = invalid('{"name": "x"}', {"type": "contains_keys", "keys": ["name", "age", "email"]})
    assert "'age'" in message and "'email'" in message and "'name'" not in message


def test_contains_keys_fails_on_output_that_is_not_json():
    assert "JSON" in invalid("name: x", {"type": "contains_keys", "keys": ["name"]})


# -- syntax_check

@pytest.mark.parametrize("reply,code", [
    ("def f(x):\n    return x + 1", "def f(x):\n    return x + 1\n"),
    (fenced("def f(x):\n    return x + 1", "python", "Here:\n", "Done."), "def f(x):\n    return x + 1\n"),
    (fenced("x = 1\n", "python"), "x = 1\n"),
])
def test_syntax_check_python_is_the_default_and_returns_code_ending_with_newline(reply, code):
    assert bridge.check_output(reply, {"type": "syntax_check"}) == code
    assert bridge.check_output(reply, {"type": "syntax_check", "language": "python"}) == code


def test_syntax_check_python_fails_with_the_line_of_the_error():
    message = invalid(fenced("x = 1\ndef f(:\n    pass", "python"), {"type": "syntax_check"})
    assert "syntax error" in message and "line 2" in message


def test_syntax_check_python_fails_on_an_empty_block():
    assert "no python code" in invalid(fenced("", "python"), {"type": "syntax_check"})


def test_syntax_check_python_checks_the_python_block_not_an_earlier_shell_block():
    reply = fenced("pip install requests", "bash") + fenced("import requests", "python")
    assert bridge.check_output(reply, {"type": "syntax_check"}) == "import requests\n"


def test_syntax_check_json():
    validation = {"type": "syntax_check", "language": "json"}
    assert bridge.check_output(fenced('{"a": 1}', "json", "Here:\n"), validation) == '{"a": 1}\n'
    assert "json does not parse" in invalid('{"a": }', validation)


def test_syntax_check_toml():
    validation = {"type": "syntax_check", "language": "toml"}
    toml = '[tool.x]\nname = "demo"\nlevel = 3'
    assert bridge.check_output(fenced(toml, "toml", "Config:\n"), validation) == toml + "\n"
    assert "toml does not parse" in invalid("name = ", validation)


def test_syntax_check_toml_prefers_the_toml_block():
    reply = fenced("import tomllib", "python") + fenced("a = 1", "toml")
    assert bridge.check_output(reply, {"type": "syntax_check", "language": "toml"}) == "a = 1\n"


# -- json_schema

SCHEMA = {"type": "object", "required": ["name", "tags"],
          "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}}


def test_json_schema_passes_and_returns_the_json():
    artifact = bridge.check_output(fenced('{"name": "n", "tags": ["a"]}', "json", "Here:\n"),
                                   {"type": "json_schema", "schema": SCHEMA})
    assert json.loads(artifact) == {"name": "n", "tags": ["a"]}


def test_json_schema_fails_naming_the_path_and_the_problem():
    message = invalid('{"name": 5, "tags": ["a", 2]}', {"type": "json_schema", "schema": SCHEMA})
    assert "schema" in message
    assert "$.name" in message and "$.tags[1]" in message


def test_json_schema_fails_on_a_missing_required_key_and_on_non_json():
    assert "tags" in invalid('{"name": "n"}', {"type": "json_schema", "schema": SCHEMA})
    assert "JSON" in invalid("name is n", {"type": "json_schema", "schema": SCHEMA})


# -- regex

def test_regex_passes_on_a_match_anywhere_and_returns_the_artifact():
    validation = {"type": "regex", "pattern": r"def \w+\("}
    assert bridge.check_output("Here:\ndef slugify(s):\n    return s", validation) == "Here:\ndef slugify(s):\n    return s"
    assert bridge.check_output(fenced("def slugify(s):\n    return s", "python", "Here:\n"), validation) \
        == "def slugify(s):\n    return s"


def test_regex_fails_naming_the_pattern():
    message = invalid("no function here", {"type": "regex", "pattern": r"def \w+\("})
    assert r"def \\w+\\(" in message or r"def \w+\(" in message


# -- unknown type

def test_unknown_validation_type_never_passes():
    """(original defect 11: an unknown type always passed)"""
    assert "unknown validation type" in invalid("anything", {"type": "looks_good"})


###############################################################################
# Original defect 16: contains_keys
###############################################################################

def test_plain_fenced_json_passes_json_and_contains_keys():
    """(original defect 16)"""
    reply = fenced('{"cases": [["A b", "a-b"]]}', "", "Here are the cases:\n")
    assert json.loads(bridge.check_output(reply, {"type": "json"})) == {"cases": [["A b", "a-b"]]}
    artifact = bridge.check_output(reply, {"type": "contains_keys", "keys": ["cases"]})
    assert json.loads(artifact) == {"cases": [["A b", "a-b"]]}


@pytest.mark.parametrize("tag", ["", "json", "JSON", "js", "javascript", "text"])
def test_contains_keys_passes_whatever_the_fence_tag(tag):
    """(original defect 16)"""
    artifact = bridge.check_output(fenced('{"a": 1}', tag), {"type": "contains_keys", "keys": ["a"]})
    assert json.loads(artifact) == {"a": 1}


@pytest.mark.parametrize("reply", ['["a", "b"]', fenced('["a", "b"]', "json"), '"abc"', "42", "null"])
def test_contains_keys_a_list_or_a_string_never_contains_keys(reply):
    """(original defect 16)"""
    message = invalid(reply, {"type": "contains_keys", "keys": ["a"]})
    assert "object" in message


###############################################################################
# Original defect 17: fence tags and same-line text
###############################################################################

@pytest.mark.parametrize("tag", ["js", "javascript", "json5", "JSON", "jsonc", "text", ""])
def test_json_in_any_tagged_fence_parses(tag):
    """(original defect 17)"""
    artifact = bridge.check_output(fenced('{"a": [1, 2]}', tag, "Here:\n"), {"type": "json"})
    assert json.loads(artifact) == {"a": [1, 2]}
    assert FENCE not in artifact


@pytest.mark.parametrize("tag", ["py", "python3", "python", "Python"])
def test_python_in_py_or_python3_fence_passes_syntax_check_without_the_tag(tag):
    """(original defect 17)"""
    artifact = bridge.check_output(fenced("def f():\n    return 1", tag, "Here:\n"), {"type": "syntax_check"})
    assert artifact == "def f():\n    return 1\n"


def test_a_fence_tag_is_never_kept_as_code():
    """A tag that happens to be valid Python alone must not sneak into the code.
    (original defect 17)"""
    artifact = bridge.check_output(fenced("x = 1", "py"), {"type": "syntax_check"})
    assert not artifact.startswith("py")
    assert bridge.check_output(fenced("x = 1", "py"), {"type": "non_empty"}) == "x = 1"


def test_text_after_the_opening_fence_on_the_same_line_is_ignored():
    """(original defect 17)"""
    reply = f"Here it is:\n{FENCE}python  # file: x.py\nx = 1\n{FENCE}\n"
    assert bridge.check_output(reply, {"type": "syntax_check"}) == "x = 1\n"
    assert bridge.check_output(reply, {"type": "non_empty"}) == "x = 1"


def test_text_before_the_fence_on_the_same_line_works():
    """(original defect 17)"""
    reply = f'Here: {FENCE}json\n{{"a": 1}}\n{FENCE}'
    assert json.loads(bridge.check_output(reply, {"type": "contains_keys", "keys": ["a"]})) == {"a": 1}
    assert bridge.check_output(f"Here: {FENCE}python\nx = 1\n{FENCE}", {"type": "syntax_check"}) == "x = 1\n"


FENCED_REPLIES = [
    (fenced("x = 1", "python", "Sure:\n", "Explanation follows."), {"type": "syntax_check"}),
    (f"{FENCE}python  # file: x.py\nx = 1\n{FENCE}", {"type": "syntax_check"}),
    (f"{FENCE}py\nx = 1\n{FENCE}", {"type": "non_empty"}),
    (f"Here: {FENCE}python\nx = 1\n{FENCE}\nbye", {"type": "non_empty"}),
    (f"Here: {FENCE}python\nx = 1\n{FENCE}\nbye", {"type": "regex", "pattern": "x = "}),
    (f"Code:\n{FENCE}python\nx = 1", {"type": "syntax_check"}),
    (fenced('{"a": 1}', "js", "Here:\n"), {"type": "json"}),
    (fenced('{"a": 1}', "", "Here:\n"), {"type": "contains_keys", "keys": ["a"]}),
    (fenced('{"a": 1}', "json"), {"type": "json_schema", "schema": {"type": "object"}}),
    (fenced("a = 1", "toml  # pyproject", "Here:\n"), {"type": "syntax_check", "language": "toml"}),
    (fenced('{"a": 1}', "json"), {"type": "syntax_check", "language": "json"}),
    ("~~~python\nx = 1\n~~~", {"type": "non_empty"}),
]


@pytest.mark.parametrize("reply,validation", FENCED_REPLIES)
def test_the_artifact_of_a_fenced_reply_never_contains_a_fence(reply, validation):
    """The artifact is what file_output writes. (original defect 17)"""
    artifact = bridge.check_output(reply, validation)
    assert FENCE not in artifact and "~~~" not in artifact
    assert "Sure" not in artifact and "Here" not in artifact and "bye" not in artifact


###############################################################################
# check_output: robustness
###############################################################################

_FRAGMENTS = st.sampled_from([
    FENCE, FENCE + "json\n", FENCE + "python\n", "~~~toml\n", "\n", "{", "}", "[", "]", '"', ":", ",",
    "<think>", "</think>", "def f(", "):", "    ", "a", "= 1", "null", "\\", "\x00", "\r\n", "1e999",
])
_ANY_TEXT = st.one_of(st.text(), st.lists(st.one_of(_FRAGMENTS, st.text(max_size=5)), max_size=30).map("".join))


@PROPERTY
@given(text=_ANY_TEXT)
def test_check_output_raises_nothing_but_output_invalid(text):
    for validation in ALL_VALIDATIONS:
        try:
            artifact = bridge.check_output(text, validation)
        except bridge.OutputInvalid as exc:
            assert str(exc).strip()
        else:
            assert isinstance(artifact, str)


DEEP_JSON_VALIDATIONS = [
    {"type": "json"},
    {"type": "contains_keys", "keys": ["a"]},
    {"type": "json_schema", "schema": {"type": "object"}},
    {"type": "syntax_check", "language": "json"},
]


@pytest.mark.parametrize("validation", DEEP_JSON_VALIDATIONS, ids=lambda v: v["type"] + v.get("language", ""))
@pytest.mark.parametrize("text", ["[" * 100_000, "[" * 5_000 + "]" * 5_000],
                         ids=["runaway-open-brackets", "deep-but-closed"])
def test_check_output_deeply_nested_json_is_output_invalid_not_a_crash(text, validation):
    """A small model stuck in a loop writes thousands of brackets; that must be a
    failed validation (retried with the error), never RecursionError."""
    invalid(text, validation)


@pytest.mark.parametrize("text", ["a = " + "[" * 5_000 + "]" * 5_000, "a = " + "[" * 100_000],
                         ids=["deep-but-closed", "runaway-open-brackets"])
def test_check_output_deeply_nested_toml_is_output_invalid_not_a_crash(text):
    invalid(text, {"type": "syntax_check", "language": "toml"})


@pytest.mark.parametrize("text", ["-" * 5_000 + "1", "-" * 100_000 + "1", "not " * 5_000 + "x"],
                         ids=["5000-minus", "100000-minus", "5000-not"])
def test_check_output_deeply_nested_python_is_output_invalid_not_a_crash(text):
    invalid(text, {"type": "syntax_check"})


###############################################################################
# Properties of the JSON types and of strip_think
###############################################################################

_SCALAR = st.none() | st.booleans() | st.integers() | st.text(max_size=10)
_JSON = st.recursive(
    _SCALAR,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
_PROSE_NO_JSON = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="{}[]`~"),
                         max_size=40)


@PROPERTY
@given(value=_JSON, wrap=st.sampled_from(["bare", "json-fence", "plain-fence"]))
def test_json_round_trips_any_value(value, wrap):
    dumped = json.dumps(value)
    reply = {"bare": dumped, "json-fence": fenced(dumped, "json"), "plain-fence": fenced(dumped)}[wrap]
    assert json.loads(bridge.check_output(reply, {"type": "json"})) == value


@PROPERTY
@given(value=st.one_of(st.lists(_JSON, max_size=4), st.dictionaries(st.text(max_size=8), _JSON, max_size=4)),
       before=_PROSE_NO_JSON, after=_PROSE_NO_JSON)
def test_json_round_trips_an_object_or_array_surrounded_by_prose(value, before, after):
    reply = before + "\n" + json.dumps(value) + "\n" + after
    assert json.loads(bridge.check_output(reply, {"type": "json"})) == value


@PROPERTY
@given(data=st.data(), value=st.dictionaries(st.text(max_size=8), _SCALAR | st.lists(_SCALAR, max_size=3), max_size=6),
       wrap=st.sampled_from(["bare", "json-fence", "plain-fence"]))
def test_contains_keys_passes_for_present_keys_and_fails_for_an_absent_one(data, value, wrap):
    dumped = json.dumps(value)
    reply = {"bare": dumped, "json-fence": fenced(dumped, "json"), "plain-fence": fenced(dumped)}[wrap]
    keys = data.draw(st.lists(st.sampled_from(sorted(value)), unique=True) if value else st.just([]))
    assert json.loads(bridge.check_output(reply, {"type": "contains_keys", "keys": keys})) == value
    absent = data.draw(st.text(max_size=8).filter(lambda k: k not in value))
    message = invalid(reply, {"type": "contains_keys", "keys": [*keys, absent]})
    assert repr(absent) in message


_NOT_THINK_END = st.text().filter(lambda s: "</think>" not in s)


@PROPERTY
@given(thought=_NOT_THINK_END, rest=st.text())
def test_split_reasoning_of_a_leading_block_equals_strip_think_of_the_rest(thought, rest):
    # strip_think also eats the whitespace after the block, so `rest` must not start
    # with whitespace for the two sides to agree (README: the block is "removed").
    assume(not re.match(r"\s", rest))
    assert answer_of(f"<think>{thought}</think>" + rest) == answer_of(rest)


@PROPERTY
@given(thought=_NOT_THINK_END, rest=st.text())
def test_split_reasoning_of_a_leading_block_equals_strip_think_of_the_rest_lstripped(thought, rest):
    assert answer_of(f"<think>{thought}</think>" + rest) == answer_of(rest.lstrip())


###############################################################################
# describe_validation
###############################################################################

@pytest.mark.parametrize("validation,must_mention", [
    ({"type": "non_empty"}, []),
    ({"type": "json"}, ["JSON"]),
    ({"type": "contains_keys", "keys": ["cases", "total"]}, ["JSON", "cases", "total"]),
    ({"type": "syntax_check"}, ["python"]),
    ({"type": "syntax_check", "language": "toml"}, ["toml"]),
    ({"type": "json_schema", "schema": {"type": "object", "required": ["name"]}}, ["JSON", "Schema", '"name"']),
    ({"type": "regex", "pattern": "^OK: .+"}, ["^OK: .+"]),
])
def test_describe_validation_says_what_answer_is_accepted(validation, must_mention):
    sentence = bridge.describe_validation(validation)
    assert isinstance(sentence, str) and len(sentence.split()) >= 3
    for word in must_mention:
        assert word in sentence


def test_prose_mentioning_a_fence_is_not_a_fence():
    """A sentence that mentions ``` mid-line does not open a block (defect 17)."""
    text = "Wrap code in ``` fences like this:\n```python\nx = 1\n```\n"
    assert bridge.find_fences(text) == [("python", "x = 1")]
    assert bridge.check_output(text, {"type": "non_empty"}) == "x = 1"


def test_empty_fenced_block_fails_non_empty():
    """An empty fenced block would write an empty file: it is not output."""
    with pytest.raises(bridge.OutputInvalid, match="fenced block is empty"):
        bridge.check_output("```python\n\n```", {"type": "non_empty"})
