"""Structured output through the official `openai` client against `kosmos-rt serve`: every
answer is checked by Python's own validators (jsonschema, json, re), greedy answers must equal
`kosmos-rt run` with the same constraint, and bad constraints get 400s naming their field.

    python scripts/serve/structured.py --base-url http://127.0.0.1:8000/v1 \
        --binary target/debug/kosmos-rt --package pkg --model pkg --image a.png --image b.png
"""

import json
import os
import re
import sys
import tempfile
from typing import Annotated, List, Literal, Optional

import httpx2 as httpx  # the HTTP client the openai package ships with
import jsonschema
import openai
import pydantic

from common import client_args, data_url, metric_sum, parse_metrics, run_reference


class Shape(pydantic.BaseModel):
    colour: Literal["red", "green", "blue", "yellow", "purple", "orange"]
    shape: Literal["circle", "square", "triangle"]
    count: int = pydantic.Field(ge=1, le=2)
    side: Optional[Literal["left", "right"]]
    note: str = pydantic.Field(max_length=6)
    # Bounded strings: a small model rambles inside an unbounded one until max_tokens.
    tags: List[Annotated[str, pydantic.Field(max_length=8)]] = pydantic.Field(max_length=2)


SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["red", "green", "blue"]},
        "sure": {"type": "boolean"},
        "score": {"type": "integer", "minimum": -3, "maximum": 12},
        "words": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"},
    },
    "required": ["answer", "score", "code"],
    "additionalProperties": False,
}


class Box(pydantic.BaseModel):
    """A nested model: its strict schema refers to Shape through $defs."""
    inside: Shape
    corner: Literal["top", "bottom"]


REPORT = {
    "type": "function",
    "function": {
        "name": "report_shape",
        "description": "Report the shape in the image.",
        "parameters": {"type": "object", "properties": {
            "colour": {"enum": ["red", "green", "blue", "yellow", "purple", "orange"]},
            "count": {"type": "integer", "minimum": 1, "maximum": 2}},
            "required": ["colour", "count"], "additionalProperties": False},
    },
}
NO_ARGS = {"type": "function", "function": {"name": "no_args"}}


def tool_calls(client, args, check, valid, messages, question):
    """Forced function calls (instructor's and LangChain's way to get structured output)."""
    img = args.image[0]
    named = {"type": "function", "function": {"name": "report_shape"}}
    r = client.chat.completions.create(model=args.model, messages=messages(img, question), max_tokens=100,
                                       temperature=0, tools=[REPORT, NO_ARGS], tool_choice=named)
    c = r.choices[0]
    calls = c.message.tool_calls or []
    ok = (len(calls) == 1 and calls[0].function.name == "report_shape" and c.message.content is None
          and valid(REPORT["function"]["parameters"], calls[0].function.arguments) is None and c.finish_reason == "stop")
    check("named tool call", ok, f"{c.finish_reason} {calls}")
    want_args = calls[0].function.arguments if calls else None

    # Streamed, the arguments come in pieces that add up to the same call.
    pieces, ids, names, finish = [], set(), set(), None
    for chunk in client.chat.completions.create(model=args.model, messages=messages(img, question), max_tokens=100,
                                                temperature=0, tools=[REPORT, NO_ARGS], tool_choice=named, stream=True):
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                ids.add(tc.id) if tc.id else None
                names.add(tc.function.name) if tc.function and tc.function.name else None
                pieces.append(tc.function.arguments or "" if tc.function else "")
            finish = ch.finish_reason or finish
    check("named tool call streamed", "".join(pieces) == want_args and len(ids) == 1 and names == {"report_shape"}
          and finish == "stop", f"{''.join(pieces)!r} {ids} {names} {finish}")

    # The client's pydantic tool helper: strict schema with $defs, parsed_arguments.
    parsed = client.chat.completions.parse(model=args.model, messages=messages(img, question), max_tokens=200,
                                           temperature=0, tools=[openai.pydantic_function_tool(Box)],
                                           tool_choice={"type": "function", "function": {"name": "Box"}})
    tc = (parsed.choices[0].message.tool_calls or [None])[0]
    check("pydantic_function_tool parse", tc is not None and isinstance(tc.function.parsed_arguments, Box),
          repr(tc.function.arguments if tc else parsed.choices[0].message.content))

    # "required" among several tools ($defs of Box rebased), sampled, streamed, one call only.
    box_tool = openai.pydantic_function_tool(Box)
    schemas = {"report_shape": REPORT["function"]["parameters"], "no_args": {"type": "object", "additionalProperties": False},
               "Box": box_tool["function"]["parameters"]}
    for seed in range(3):
        calls, finish = {}, None
        for chunk in client.chat.completions.create(model=args.model, messages=messages(img, question), max_tokens=200,
                                                    temperature=0.8, seed=seed, tools=[REPORT, NO_ARGS, box_tool],
                                                    tool_choice="required", parallel_tool_calls=False, stream=True):
            for ch in chunk.choices:
                for tc in ch.delta.tool_calls or []:
                    entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                    entry["name"] += tc.function.name or ""
                    entry["arguments"] += tc.function.arguments or ""
                finish = ch.finish_reason or finish
        ok = finish == "tool_calls" and len(calls) == 1 and all(
            c["name"] in schemas and valid(schemas[c["name"]], c["arguments"]) is None for c in calls.values())
        check(f"required tool call streamed, seed {seed}", ok or finish == "length", f"{finish} {calls}")

    # A conversation that gives a call's result back, then asks on.
    convo = messages(img, question) + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "report_shape", "arguments": want_args or "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "noted"},
        {"role": "user", "content": "Question: how many shapes are there? Answer:"},
    ]
    r = client.chat.completions.create(model=args.model, messages=convo, max_tokens=8, temperature=0)
    check("conversation with a tool result", r.choices[0].finish_reason in ("stop", "length"), repr(r.choices[0].message.content))


def main():
    args = client_args(__doc__)
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0)
    failures = []

    def check(what, ok, detail=""):
        print(f"{'ok' if ok else 'FAIL':6} {what} {detail}")
        if not ok:
            failures.append(what)

    def valid(schema, text):
        try:
            value = json.loads(text)
        except ValueError as e:
            return f"not JSON: {e}"
        errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(value)]
        return errors[0] if errors else None

    def messages(img, text):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                              {"type": "text", "text": text}]}]

    question = "Question: what colour is the circle? Answer:"
    schema_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(SCHEMA, schema_file)
    schema_file.close()
    for img in args.image:
        # OpenAI's json_schema response format, greedy: valid, and equal to `kosmos-rt run`.
        r = client.chat.completions.create(
            model=args.model, messages=messages(img, question), max_tokens=200, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}})
        text = r.choices[0].message.content
        check(f"json_schema {img}", valid(SCHEMA, text) is None and r.choices[0].finish_reason == "stop",
              f"{text!r} {valid(SCHEMA, text)}")
        want = run_reference(args.binary, args.package, prompt=question, images=[img], max_tokens=200,
                             extra=["--json-schema", schema_file.name])
        check(f"json_schema equals kosmos-rt run {img}", text == want, f"server={text!r} run={want!r}")
        # Keys come in schema order.
        keys = list(json.loads(text).keys())
        check("keys in schema order", keys == [k for k in SCHEMA["properties"] if k in keys], str(keys))

        # The client's pydantic helper (strict schema with $defs, anyOf null, titles).
        parsed = client.chat.completions.parse(
            model=args.model, messages=messages(img, question), max_tokens=200, temperature=0, response_format=Shape)
        msg = parsed.choices[0].message
        check(f"pydantic parse {img}", msg.parsed is not None and isinstance(msg.parsed, Shape), repr(msg.content))

        # json_object, sampled, streamed: the concatenated pieces are one JSON object.
        for seed in range(3):
            stream = client.chat.completions.create(
                model=args.model, messages=messages(img, question), max_tokens=200, temperature=1.0, seed=seed,
                stream=True, response_format={"type": "json_object"})
            pieces, finish = [], None
            for chunk in stream:
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
            text = "".join(pieces)
            try:
                ok = isinstance(json.loads(text), dict) or finish == "length"
            except ValueError:
                ok = finish == "length"
            check(f"json_object stream seed {seed}", ok, f"{finish} {text[:80]!r}")

        # vLLM's guided_choice and guided_regex through extra_body.
        colours = ["red", "green", "blue", "yellow", "purple", "orange"]
        r = client.chat.completions.create(model=args.model, messages=messages(img, question), max_tokens=8,
                                           temperature=0, extra_body={"guided_choice": colours})
        text = r.choices[0].message.content
        check(f"guided_choice {img}", text in colours, repr(text))
        want = run_reference(args.binary, args.package, prompt=question, images=[img], max_tokens=8,
                             extra=sum((["--choice", c] for c in colours), []))
        check(f"guided_choice equals kosmos-rt run {img}", text == want, f"server={text!r} run={want!r}")
        pattern = r"a (big |small )?(red|blue) [a-z]+( on the (left|right))?"
        r = client.chat.completions.create(model=args.model, messages=messages(img, ""), max_tokens=24, temperature=0.7,
                                           seed=1, n=3, extra_body={"guided_regex": pattern})
        for i, c in enumerate(r.choices):
            text = c.message.content
            check(f"guided_regex choice {i} {img}", re.fullmatch(pattern, text) is not None or c.finish_reason == "length",
                  f"{c.finish_reason} {text!r}")

    # Completions with a schema given as JSON text (vLLM takes both), and structured_outputs.
    r = client.completions.create(model=args.model, prompt="Answer in JSON:", max_tokens=200, temperature=0,
                                  extra_body={"guided_json": json.dumps(SCHEMA)})
    check("completions guided_json", valid(SCHEMA, r.choices[0].text) is None, repr(r.choices[0].text))
    r = client.completions.create(model=args.model, prompt="Say yes or no:", max_tokens=4, temperature=0,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    check("completions structured_outputs.choice", r.choices[0].text in ("yes", "no"), repr(r.choices[0].text))
    gbnf = 'root ::= item ("," item){0,2}\nitem ::= [a-z]{1,4}'
    r = client.completions.create(model=args.model, prompt="List:", max_tokens=30, temperature=0,
                                  extra_body={"guided_grammar": gbnf})
    text = r.choices[0].text
    check("completions guided_grammar", re.fullmatch(r"[a-z]{1,4}(,[a-z]{1,4}){0,2}", text) is not None, repr(text))

    # Bad constraints: a 400 naming the field, and the server goes on.
    bad = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
         "response_format", "uniqueItems"),
        ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
        ({"guided_regex": "(a)\\1"}, "guided_regex", "backreference"),
        ({"guided_grammar": "root ::= root \"a\" | \"b\""}, "guided_grammar", "left-recursive"),
        ({"guided_choice": ["a"], "guided_regex": "a"}, None, "one structured-output constraint"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tool_choice", "auto"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}},
         "tool_choice", "'g', which is not in tools"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
          "response_format": {"type": "json_object"}}, "tool_choice", "not both"),
        ({"functions": [{"name": "f"}]}, "functions", "deprecated"),
    ]
    for extra, param, says in bad:
        try:
            client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, extra_body=extra)
            check(f"bad {extra}", False, "no error")
        except openai.BadRequestError as e:
            body = e.body if isinstance(e.body, dict) else {}
            ok = says in str(body.get("message", "")) and (param is None or body.get("param") == param)
            check(f"400 for {list(extra)}", ok, str(body))
    tool_calls(client, args, check, valid, messages, question)
    metrics = parse_metrics(httpx.get(args.base_url.removesuffix("/v1") + "/metrics").text)
    tokens = metric_sum(metrics, "kosmos_constrained_tokens_total")
    seconds = metric_sum(metrics, "kosmos_constrained_pick_seconds_total")
    check("metrics count constrained tokens", tokens > 100 and seconds > 0, f"{tokens} tokens, {seconds:.3f} s")
    os.unlink(schema_file.name)
    if failures:
        print(f"{len(failures)} failed: {failures}")
        sys.exit(1)


if __name__ == "__main__":
    main()
