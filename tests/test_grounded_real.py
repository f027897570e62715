"""Grounded answers on the real server (issue 25): llama-cpp-python takes the span schema
(an enum in $defs that every value refers to) and enforces it, so each value SmolLM2-135M
answers is a span of the sentence. `make test-real` runs it; `make test` skips it."""

from __future__ import annotations

import json

import pytest

import bridge

pytestmark = pytest.mark.real_model


SENTENCE = "Flight TP1234 departs LIS 09:10 and arrives OPO 10:05, gate 14."
PROMPT = (f'Read this sentence: "{SENTENCE}" Return a JSON object with the keys "flight", "from", '
          '"to", "departs", "arrives" and "gate", taken from the sentence.')
VALIDATION = {"type": "contains_keys", "grounded": True,
              "keys": ["flight", "from", "to", "departs", "arrives", "gate"]}


def test_the_span_schema_is_enforced_by_llama_cpp_python(real_server):
    schema = bridge.output_schema(VALIDATION, [PROMPT])
    spans = schema["$defs"]["bridge_span"]["enum"]
    config = bridge.Config(db_paths=(), base_url=real_server, timeout_s=120)
    with bridge.LLMClient(config) as client:
        reply = client.chat([{"role": "user", "content": PROMPT}], bridge.ChatRequest(
            "smollm2-135m", {"temperature": 0}, max_tokens=120, json_schema=schema))
    answer = json.loads(reply.text)
    assert set(answer) == set(VALIDATION["keys"])
    for value in answer.values():
        items = value if isinstance(value, list) else [value]
        assert all(item is None or isinstance(item, bool) or item in spans or item == 14
                   for item in items), answer
    bridge.check_output(reply.text, VALIDATION, PROMPT)       # and so it passes the check
