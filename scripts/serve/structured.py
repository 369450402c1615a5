"""Structured output through the official `openai` client against `kosmos-rt serve`: every
answer is checked by Python's own validators (jsonschema, json, re), greedy answers must equal
`kosmos-rt run` with the same constraint, and bad constraints get 400s naming their field.

    python scripts/serve/structured.py --base-url http://127.0.0.1:8000/v1 \
        --binary target/debug/kosmos-rt --package pkg --model pkg --image a.png --image b.png
"""

import argparse
import json
import os
import re
import sys
import tempfile
from typing import Annotated, List, Literal, Optional

import jsonschema
import openai
import pydantic

from common import data_url, run_reference


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--package", required=True)
    ap.add_argument("--image", action="append", required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
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
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", "not supported"),
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
    os.unlink(schema_file.name)
    if failures:
        print(f"{len(failures)} failed: {failures}")
        sys.exit(1)


if __name__ == "__main__":
    main()
