#!/usr/bin/env python3
"""Judges kosmos-grammar's matcher against Python's own validators.

usage: structured_check.py cases            print the cases as JSON
       structured_check.py judge RESULTS    RESULTS: the cases with each candidate's "accepted"

Cases are JSON Schemas and regular expressions, each with candidate texts: valid instances
written the ways a model may write them (compact or json.dumps' spacing, \\u escapes or not), random JSON
values, and random edits of all of these; patterns get example matches, their edits and random
strings. The judge requires, with jsonschema (Draft 2020-12) and re.fullmatch (re.ASCII, as
ECMA-262's \\d \\w are ASCII):

* schema soundness: every accepted text parses as JSON and the schema accepts it;
* schema completeness: every instance the case lists as valid, in each of its spellings, is
  accepted (keys are written in schema order, which is the order the grammar generates);
* patterns: accepted exactly when re.fullmatch matches (both directions).

Never imports project code. Prints one JSON object; exit status 0 only if every check passes.
"""
import json
import random
import re
import sys

import jsonschema

SCHEMAS = [
    ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                        "email": {"type": "string"}}, "required": ["name"]},
     [{"name": "Ann"}, {"name": "", "age": 150, "email": "a@b"}, {"name": "x\u0001\"", "age": 0}]),
    ({"type": "object",
      "properties": {"colour": {"enum": ["red", "green", "blue"]}, "shape": {"enum": ["circle", "square", "triangle"]},
                     "count": {"type": "integer", "minimum": 1, "maximum": 2}, "left": {"type": "boolean"}},
      "required": ["colour", "shape"]},
     [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square", "count": 2, "left": False},
      {"colour": "green", "shape": "triangle", "left": True}]),
    ({"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3},
     [[1], [1.5, -2, 3e4], [0, 0.25]]),
    ({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 4}},
                                        "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$", "examples": ["AB-123", "ZZ-000"]}},
      "required": ["id"], "additionalProperties": False},
     [{"id": "AB-123"}, {"tags": [], "id": "ZZ-000"}, {"tags": ["a", "bcd\"", "é中"], "id": "QQ-999"}]),
    ({"anyOf": [{"type": "string", "minLength": 2}, {"type": "integer", "exclusiveMaximum": -3}, {"type": "null"}]},
     ["ab", "é\n\t\\", -4, -100, None]),
    ({"type": ["boolean", "null"]}, [True, False, None]),
    ({"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                         "required": ["v"]}}, "$ref": "#/$defs/node"},
     [{"v": 1}, {"v": -2, "kids": [{"v": 3}, {"v": 4, "kids": []}]}]),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, [{}, {"a": 1, "b": -2}, {"": 0}]),
    ({"type": "object", "properties": {"when": {"type": "string", "format": "date", "examples": ["1999-12-31", "2024-02-09"]},
                                        "id": {"type": "string", "format": "uuid", "examples": ["00000000-0000-0000-0000-00000000000A"]}},
      "required": ["when", "id"]},
     [{"when": "2024-02-29", "id": "123e4567-e89b-12d3-a456-426614174000"}]),
    ({"type": "array", "prefixItems": [{"const": "x"}, {"type": "integer", "minimum": 10}, {"type": "object"}]},
     [["x", 10, {}], ["x", 99999, {"k": [1, {"z": None}]}]]),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^(yes|no|\"q\"|a\\\\b|\\n)+$", "examples": ["no", "yes\n"]}}, "required": ["a"]},
     [{"a": "yes"}, {"a": "no\"q\"yes"}, {"a": "a\\b\n"}]),
    ({"type": "object", "properties": {"p": {"type": "number"}, "q": {"type": "string", "minLength": 1, "maxLength": 2},
                                        "r": {"type": "array", "items": {"type": "integer"}, "maxItems": 0}}},
     [{}, {"p": 1}, {"q": "ab", "r": []}, {"p": -0.5e-3, "q": "中", "r": []}]),
]

SCHEMAS.append(({"type": "object", "properties": {
    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    "offset": {"type": "number", "exclusiveMinimum": -2.5, "exclusiveMaximum": 10},
    "price": {"type": "number", "minimum": 0.01},
    "delta": {"type": "number", "maximum": -0.125}},
    "required": ["confidence", "offset"], "additionalProperties": False},
    [{"confidence": 0.5, "offset": -2.4999}, {"confidence": 1, "offset": 9.99, "price": 0.01, "delta": -0.125},
     {"confidence": 0, "offset": 0, "price": 12345.678, "delta": -7}]))

PATTERNS = [
    ("[a-c]+x", ["ax", "abcx", "ccccx"]),
    ("^(ab|c)*d?$", ["", "ab", "abcab", "cd", "d"]),
    ("\\d{3}-\\d{2,4}", ["123-45", "000-0000"]),
    ("[^a-z\\s]{1,3}", ["A", "1!?", "中é"]),
    ("(red|green|blue) (circle|square)", ["red circle", "blue square"]),
    ("\\w+@\\w+\\.(com|org)", ["a@b.com", "x_1@y2.org"]),
    ("a.c", ["abc", "a c", "a中c"]),
    ("[\\]\\-^]+", ["]", "-^]"]),
    ("(?:x|y){2}z{0,}", ["xy", "yyzzz"]),
    ("-?(0|[1-9][0-9]*)(\\.[0-9]+)?", ["0", "-12.5", "7"]),
    ("é+|中", ["é", "ééé", "中"]),
    ("[A-Fa-f0-9]{2}(:[A-Fa-f0-9]{2}){2}", ["0a:Bc:ff"]),
    ("\\{\\}|{", ["{}", "{"]),
    ("a+?b*?", ["a", "aab"]),
    ("\\x41\\u00e9\\t", ["Aé\t"]),
]

ALPHABET = list("abcxyzABCD0123456789-_.:,;{}[]\"\\ \n\té中@!") + ["true", "null", "1e5", "\"k\":"]


def spellings(value):
    """The ways the grammar may write a value: compact or one space after , and :, any characters
    as themselves or as \\u escapes."""
    return {json.dumps(value, ensure_ascii=False, separators=(",", ":")), json.dumps(value, ensure_ascii=False),
            json.dumps(value)}


def edits(text, rng, n):
    out = set()
    for _ in range(n):
        t = text
        for _ in range(rng.randint(1, 3)):
            i = rng.randint(0, len(t))
            op = rng.randint(0, 2)
            if op == 0 and t:
                i = min(i, len(t) - 1)
                t = t[:i] + t[i + 1:]
            elif op == 1:
                t = t[:i] + rng.choice(ALPHABET) + t[i:]
            elif t:
                i = min(i, len(t) - 1)
                t = t[:i] + rng.choice(ALPHABET) + t[i + 1:]
        out.add(t)
    return out


def random_value(rng, depth=0):
    kind = rng.randint(0, 6 if depth < 2 else 4)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -3, 42, 151, 2.5, -0.125, 1e20])
    if kind == 3:
        return rng.choice(["", "red", "circle", "a\"b", "é", "AB-123", "2024-01-31", "x"])
    if kind == 4:
        return rng.choice(["blue", "square", "ab", "yes"])
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["name", "age", "colour", "shape", "count", "left", "v", "kids", "id", "tags", "a", "p", "q", "r", "when", "k"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def sample_schema(schema, rng, root, depth=0):
    """A random instance of `schema` (the keywords the cases use); `examples` seed strings."""
    if "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        return sample_schema(node, rng, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return sample_schema(rng.choice(schema[key]), rng, root, depth + 1)
    if "examples" in schema:
        return rng.choice(schema["examples"])
    t = schema.get("type", "object")
    if isinstance(t, list):
        t = rng.choice(t)
    if t == "null":
        return None
    if t == "boolean":
        return rng.choice([True, False])
    if t == "integer":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -10**6 - 1) + 1)
        hi = schema.get("maximum", schema.get("exclusiveMaximum", 10**6 + 1) - 1)
        return rng.choice([lo, hi, rng.randint(lo, hi)])
    if t == "number":
        if not any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
            return rng.choice([0, -1, 2.5, -0.001, 1e-7, 123456.75, rng.uniform(-1e3, 1e3)])
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -1e3))
        hi = schema.get("maximum", schema.get("exclusiveMaximum", 1e3))
        return rng.choice([lo, hi, round(rng.uniform(lo, hi), 4), round(rng.uniform(lo, hi), 1)])
    if t == "string":
        n = rng.randint(schema.get("minLength", 0), schema.get("maxLength", 6))
        return "".join(rng.choice("ab Zé中\"\\\n\t\u0001/") for _ in range(n))
    if t == "array":
        if "prefixItems" in schema:
            return [sample_schema(x, rng, root, depth + 1) for x in schema["prefixItems"]]
        hi = schema.get("maxItems", 3 if depth < 3 else 0)
        n = rng.randint(schema.get("minItems", 0), max(hi, schema.get("minItems", 0)))
        return [sample_schema(schema.get("items", {"type": "integer"}), rng, root, depth + 1) for _ in range(n)]
    props = schema.get("properties", {})
    required = schema.get("required", [])
    if not props and isinstance(schema.get("additionalProperties"), dict):
        return {rng.choice(["a", "b", "", "é"]): sample_schema(schema["additionalProperties"], rng, root, depth + 1)
                for _ in range(rng.randint(0, 3))}
    return {k: sample_schema(v, rng, root, depth + 1) for k, v in props.items()
            if k in required or (depth < 3 and rng.random() < 0.5)}


def sample_pattern(pattern, rng):
    """A random string re.fullmatch accepts, from Python's own parse of the pattern."""
    from re import _constants as c, _parser as p

    def gen(items):
        out = []
        for op, av in items:
            if op is c.LITERAL:
                out.append(chr(av))
            elif op is c.ANY:
                out.append(rng.choice("aZ0 é中-"))
            elif op is c.IN:
                out.append(pick_in(av))
            elif op is c.BRANCH:
                out.append(gen(rng.choice(av[1])))
            elif op is c.SUBPATTERN:
                out.append(gen(av[3]))
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT):
                lo, hi, sub = av
                n = rng.randint(lo, min(hi, lo + 3))
                out.append("".join(gen(sub) for _ in range(n)))
            elif op is c.AT:
                pass
            else:
                raise ValueError(f"cannot sample {op}")
        return "".join(out)

    def pick_in(items):
        pool = "abcxyzABCDFf0123456789-_]^\\ \té中!@{}:"
        for _ in range(200):
            ch = rng.choice(pool)
            if re.fullmatch(p_in(items), ch, re.ASCII):
                return ch
        raise ValueError("no sample for a class")

    def p_in(items):
        return "[" + "".join(class_text(op, av) for op, av in items) + "]"

    def class_text(op, av):
        if op is c.NEGATE:
            return "^"
        if op is c.LITERAL:
            return re.escape(chr(av))
        if op is c.RANGE:
            return re.escape(chr(av[0])) + "-" + re.escape(chr(av[1]))
        if op is c.CATEGORY:
            return {c.CATEGORY_DIGIT: "\\d", c.CATEGORY_WORD: "\\w", c.CATEGORY_SPACE: "\\s",
                    c.CATEGORY_NOT_DIGIT: "\\D", c.CATEGORY_NOT_WORD: "\\W", c.CATEGORY_NOT_SPACE: "\\S"}[av]
        raise ValueError(f"class item {op}")

    return gen(p.parse(pattern))


def cases():
    rng = random.Random(0)
    out = {"schemas": [], "patterns": []}
    for schema, valid in SCHEMAS:
        texts = set()
        listed = set()
        validator = jsonschema.Draft202012Validator(schema)
        for v in valid + [sample_schema(schema, rng, schema) for _ in range(60)]:
            # Only what jsonschema itself accepts is listed as valid.
            if not validator.is_valid(v):
                if v in valid:
                    raise SystemExit(f"case instance {v!r} is not valid under {schema}")
                continue
            for s in sorted(spellings(v)):
                listed.add(s)
                texts |= edits(s, rng, 8)
        texts |= listed
        for _ in range(300):
            v = random_value(rng)
            s = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
            texts.add(s)
            texts |= edits(s, rng, 1)
        out["schemas"].append({"schema": schema, "valid": sorted(listed), "candidates": sorted(texts)})
    for pattern, examples in PATTERNS:
        examples = examples + [sample_pattern(pattern, rng) for _ in range(60)]
        texts = set(examples)
        for e in examples:
            texts |= edits(e, rng, 60)
        for _ in range(200):
            texts.add("".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6))))
        out["patterns"].append({"pattern": pattern, "candidates": sorted(texts)})
    return out


def judge(path):
    results = json.load(open(path))
    failures = []
    counts = {"schema_texts": 0, "schema_accepted": 0, "pattern_texts": 0, "pattern_matches": 0}
    for case in results["schemas"]:
        schema = case["schema"]
        if "error" in case:
            failures.append({"schema": schema, "error": case["error"]})
            continue
        validator = jsonschema.Draft202012Validator(schema)
        for text, accepted in zip(case["candidates"], case["accepted"]):
            counts["schema_texts"] += 1
            if not accepted:
                if text in case["valid"]:
                    failures.append({"schema": schema, "text": text, "why": "a valid instance was rejected"})
                continue
            counts["schema_accepted"] += 1
            try:
                value = json.loads(text)
            except ValueError as e:
                failures.append({"schema": schema, "text": text, "why": f"accepted but not JSON: {e}"})
                continue
            errors = [e.message for e in validator.iter_errors(value)]
            if errors:
                failures.append({"schema": schema, "text": text, "why": f"accepted but invalid: {errors[0]}"})
    for case in results["patterns"]:
        rx = re.compile(case["pattern"], re.ASCII)
        for text, accepted in zip(case["candidates"], case["accepted"]):
            counts["pattern_texts"] += 1
            want = rx.fullmatch(text) is not None
            counts["pattern_matches"] += want
            if want != accepted:
                failures.append({"pattern": case["pattern"], "text": text, "accepted": accepted, "fullmatch": want})
    print(json.dumps({"ok": not failures, **counts, "failures": failures[:20]}, ensure_ascii=False, indent=1))
    return not failures


if __name__ == "__main__":
    if sys.argv[1:] == ["cases"]:
        json.dump(cases(), sys.stdout, ensure_ascii=False)
    elif len(sys.argv) == 3 and sys.argv[1] == "judge":
        sys.exit(0 if judge(sys.argv[2]) else 1)
    else:
        sys.exit(__doc__)
