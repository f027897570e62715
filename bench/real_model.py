"""First-attempt validity of JSON steps on a real model, with and without
structured output (response_format). Prints figures, never pass/fail.

Runs a fixed set of 24 JSON steps (contains_keys and json_schema) on SmolLM2-135M
through llama.cpp's server (examples/llama_server.py), twice: once as bridge sends
them by default (constrained JSON negotiated with the server), once with
--no-structured. Each step gets exactly one attempt; the output is checked with
bridge's own validators. Needs the demo extra: `make bench`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import bridge  # noqa: E402
import llama_server  # noqa: E402

PEOPLE = [("Ada Lovelace", "London", 36), ("Alan Turing", "Manchester", 41), ("Grace Hopper", "Arlington", 85),
          ("Linus Torvalds", "Portland", 56), ("Margaret Hamilton", "Boston", 90), ("Guido van Rossum", "Belmont", 70)]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def steps() -> list[tuple[str, dict]]:
    """Return the fixed benchmark: (prompt, validation) pairs, 24 of them."""
    out: list[tuple[str, dict]] = []
    for name, city, age in PEOPLE:
        out.append((f"{name} lives in {city} and is {age} years old. Return a JSON object with the keys "
                    '"name", "city" and "age".', {"type": "contains_keys", "keys": ["name", "city", "age"]}))
        out.append((f"Return a JSON object with the key \"initials\" holding the initials of {name}.",
                    {"type": "contains_keys", "keys": ["initials"]}))
    for colour in COLOURS:
        out.append((f"Return a JSON object describing the colour {colour}: keys \"colour\" (string) and "
                    "\"warm\" (true or false).",
                    {"type": "json_schema", "schema": {"type": "object", "required": ["colour", "warm"],
                                                       "properties": {"colour": {"type": "string"},
                                                                      "warm": {"type": "boolean"}}}}))
        out.append((f"Return a JSON object with a key \"items\": a list of three words that rhyme with {colour}.",
                    {"type": "json_schema", "schema": {"type": "object", "required": ["items"],
                                                       "properties": {"items": {"type": "array"}}}}))
    return out


def first_attempt_rate(base_url: str, structured: bool) -> tuple[float, float, str]:
    """Return (share of steps valid on their first attempt, seconds, negotiated form)."""
    config = bridge.Config(db_paths=(), base_url=base_url, timeout_s=120, retries=1, structured=structured)
    valid = 0
    started = time.monotonic()
    with bridge.LLMClient(config) as client:
        for prompt, validation in steps():
            step = bridge.Step(id=1, prompt=prompt, validation=validation, temperature=0, max_tokens=200)
            plan = bridge.Plan(id="bench", steps={1: step})
            reply = client.chat(bridge.build_messages(plan, step, {}), model=llama_server.MODEL_ALIAS,
                                temperature=0, max_tokens=200,
                                json_schema=bridge.output_schema(validation))
            try:
                bridge.check_output(bridge.strip_think(reply.text), validation)
                valid += 1
            except bridge.OutputInvalid:
                pass
        level = client.structured_level
    form = "none" if level >= len(bridge.RESPONSE_FORMS) else ("json_schema", "json_object")[level]
    return valid / len(steps()), time.monotonic() - started, form


def main() -> int:
    problem = llama_server.missing_parts()
    if problem:
        print(f"bench: {problem}")
        return 2
    log = Path(tempfile.mkdtemp(prefix="bridge-bench-")) / "server.log"
    with llama_server.running_server(log) as base_url:
        on, on_s, form = first_attempt_rate(base_url, structured=True)
        off, off_s, _ = first_attempt_rate(base_url, structured=False)
    n = len(steps())
    print(f"steps: {n} JSON steps, one attempt each, temperature 0, SmolLM2-135M-Instruct (llama.cpp)")
    print(f"structured ({form}): {on:.0%} valid on first attempt, {on_s:.1f} s")
    print(f"plain text:          {off:.0%} valid on first attempt, {off_s:.1f} s")
    ratio = f"{on / off:.2f}" if off else "inf"
    print(f"first-attempt validity: structured {on:.2f}, plain {off:.2f}, ratio {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
