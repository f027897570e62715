"""The validation types are one registry (the room 'Validation types'): the plan schema
lists what it holds, and a type registered there is validated in a plan, described in the
prompt, budgeted and checked with no other edit."""

from __future__ import annotations

import copy

import pytest

import bridge
from fakes import insert_plan, make_plan, run_json, steps_by_id, trust_project


def _validation_schema(schema: dict) -> dict:
    return schema["$defs"]["validation"]


def test_the_plan_schema_lists_exactly_the_registered_types():
    validation = _validation_schema(bridge.load_schema())
    assert set(validation["properties"]["type"]["enum"]) == set(bridge.VALIDATION_TYPES)
    grounded = [rule["then"]["properties"]["type"]["enum"] for rule in validation["allOf"]
                if rule["if"] == {"required": ["grounded"]}]
    assert [set(g) for g in grounded] == [
        {name for name, kind in bridge.VALIDATION_TYPES.items() if kind.grounded}]


class Shouting(bridge.ValidationType):
    """A throwaway type: the answer in capitals."""

    __slots__ = ()
    name = "shouting"
    max_tokens = 77

    def check(self, text, validation, source):
        if text != text.upper():
            raise bridge.OutputInvalid("the answer is not in capitals")
        return text.strip()

    def describe(self, validation):
        return "Answer in CAPITALS only."

    def problems(self, validation, where):
        return [f"{where}.pattern: shouting takes no pattern"] if "pattern" in validation else []


@pytest.fixture
def shouting(monkeypatch):
    """Register Shouting for one test, and name it in (a copy of) the plan schema."""
    monkeypatch.setattr(bridge, "VALIDATION_TYPES", dict(bridge.VALIDATION_TYPES))
    bridge.register_validation(Shouting)
    schema = copy.deepcopy(bridge.load_schema())
    _validation_schema(schema)["properties"]["type"]["enum"].append("shouting")
    monkeypatch.setattr(bridge, "load_schema", lambda: schema)
    return {"type": "shouting"}


def test_a_registered_type_is_validated_in_a_plan(shouting):
    plan = bridge.check_plan(make_plan("p1", [{"id": 1, "prompt": "Shout.", "validation": shouting}]))
    assert plan.steps[1].validation == shouting
    with pytest.raises(bridge.PlanInvalid) as info:
        bridge.check_plan(make_plan("p1", [{"id": 1, "prompt": "Shout.",
                                            "validation": {**shouting, "pattern": "x"}}]))
    assert "$.steps[0].validation.pattern: shouting takes no pattern" in str(info.value)


def test_a_registered_type_is_described_budgeted_and_checked(shouting):
    step = bridge.Step(id=1, prompt="Shout.", validation=[shouting, {"type": "non_empty"}])
    assert bridge.describe_validation(step.validation).startswith("Answer in CAPITALS only.")
    assert bridge.answer_tokens(step, None) == bridge.ANSWER_RESERVE_TOKENS
    assert bridge.answer_tokens(step._replace(validation=shouting), None) == 77
    assert bridge.output_schema(shouting) is None and bridge.checked_depth(shouting) is None
    assert bridge.check_output("HELLO\n", shouting) == "HELLO"
    with pytest.raises(bridge.OutputInvalid, match="not in capitals"):
        bridge.check_output("hello", step.validation)


def test_a_registered_type_is_told_to_the_model_and_retried(capsys, db, fake_llm, state_dir,
                                                             shouting):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Shout hello.", "max_retries": 1,
                                      "validation": shouting}]))
    fake_llm.enqueue("hello").enqueue("HELLO")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    assert steps_by_id(result)[1]["output"] == "HELLO"
    first, second = (r["json"]["messages"] for r in fake_llm.chat_requests)
    assert "Answer in CAPITALS only." in first[-1]["content"]
    assert "the answer is not in capitals" in second[-1]["content"]


def test_an_answer_that_passes_keeps_the_constraint_when_its_command_fails(
        capsys, db, fake_llm, state_dir, project):
    """grammar_damage is asked only of an answer its check refused: a '?' key in an answer
    that passed, whose command then failed, is not taken for the grammar's damage."""
    trust_project(project)
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Who?", "max_retries": 1,
                                      "file_output": "who.json",
                                      "validation": [{"type": "contains_keys", "keys": ["name"]},
                                                     {"type": "command", "run": ["false"]}]}],
                              context={"objective": "o", "project": str(project)}))
    fake_llm.enqueue('{"name": "Ada", "wh?": 1}').enqueue('{"name": "Ada", "wh?": 1}')

    rc, _, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 1
    assert ["response_format" in r["json"] for r in fake_llm.chat_requests] == [True, True]
