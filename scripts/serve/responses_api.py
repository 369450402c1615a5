"""OpenAI's Responses API (`/v1/responses`) through the official `openai` client: image and
text input items, a string input with instructions, streaming events, logprobs, a JSON-Schema
text.format, forced function calls (named and "required", streamed, a call's output given back),
and the refusals of what a stateless server cannot do. Greedy answers must equal
`kosmos-rt run` on the same prompt (the package has no chat template, so the chat is its messages'
text joined by newlines, images in place).

    python scripts/serve/responses_api.py --base-url http://127.0.0.1:8000/v1 \
        --binary target/debug/kosmos-rt --package pkg --image a.png --image b.png --model pkg
"""

import json
import os
import sys
import tempfile

import jsonschema
import openai

from common import checker, client_args, data_url, run_reference


def main():
    args = client_args(__doc__)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    failures = []

    check = checker(failures)

    question = "Question: what colour is the square? Answer:"
    for img in args.image:
        want = run_reference(args.binary, args.package, prompt=question, images=[img], max_tokens=8)
        content = [
            {"type": "input_image", "image_url": data_url(img)},
            {"type": "input_text", "text": question},
        ]
        r = client.responses.create(
            model=args.model,
            input=[{"role": "user", "content": content}],
            max_output_tokens=8,
            temperature=0,
        )
        check(f"image + text input {img}", r.output_text.strip(), want)
        check("object", r.object, "response")
        check("status", r.status in ("completed", "incomplete"), True)
        check("one message item", [(o.type, o.role) for o in r.output], [("message", "assistant")])
        chat = client.chat.completions.create(
            model=args.model,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(img)}},
                {"type": "text", "text": question},
            ]}],
            max_tokens=8,
            temperature=0,
        )
        check("input_tokens = the chat's prompt_tokens", r.usage.input_tokens, chat.usage.prompt_tokens)
        check("output_tokens = the chat's completion_tokens", r.usage.output_tokens, chat.usage.completion_tokens)
        check("total_tokens", r.usage.total_tokens, r.usage.input_tokens + r.usage.output_tokens)

        # Streaming: the deltas make the final text, which is the plain answer's.
        deltas, kinds, final, numbers = [], [], None, []
        for ev in client.responses.create(
            model=args.model,
            input=[{"role": "user", "content": content}],
            max_output_tokens=8,
            temperature=0,
            stream=True,
        ):
            kinds.append(ev.type)
            numbers.append(ev.sequence_number)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
            if ev.type in ("response.completed", "response.incomplete"):
                final = ev.response
        check(f"stream {img}", "".join(deltas).strip(), want)
        check("stream final text", final is not None and final.output_text, "".join(deltas))
        check("stream sequence numbers", numbers, list(range(len(numbers))))
        check(
            "stream event order",
            [k for k in kinds if k != "response.output_text.delta"],
            ["response.created", "response.in_progress", "response.output_item.added",
             "response.content_part.added", "response.output_text.done", "response.content_part.done",
             "response.output_item.done", final and f"response.{final.status}"],
        )

    # A string input after instructions: two messages, joined by a newline without a template.
    instructions = "Answer with colours."
    text = "a red circle on the left and a blue"
    want = run_reference(args.binary, args.package, prompt=f"{instructions}\n{text}", max_tokens=6)
    r = client.responses.create(
        model=args.model, instructions=instructions, input=text, max_output_tokens=6, temperature=0
    )
    check("instructions + string input", r.output_text.strip(), want)
    check("instructions echoed", r.instructions, instructions)
    if r.usage.output_tokens == 6:
        check("cut by max_output_tokens", (r.status, r.incomplete_details.reason), ("incomplete", "max_output_tokens"))

    # Log-probabilities: one entry per output token, each the chat endpoint's for the same prompt.
    r = client.responses.create(
        model=args.model, input=text, max_output_tokens=5, temperature=0,
        include=["message.output_text.logprobs"], top_logprobs=2,
    )
    lp = r.output[0].content[0].logprobs
    check("logprobs entries", len(lp), r.usage.output_tokens)
    chat = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": text}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=2,
    )
    check("logprobs tokens = chat's", [e.token for e in lp], [e.token for e in chat.choices[0].logprobs.content])
    worst = max(abs(a.logprob - b.logprob) for a, b in zip(lp, chat.choices[0].logprobs.content))
    check("logprobs = chat's (≤1e-5)", worst <= 1e-5, True)
    check("two alternatives each", {len(e.top_logprobs) for e in lp}, {2})

    # text.format with a JSON Schema: valid JSON in the schema's key order, equal to `run`.
    schema = {
        "type": "object",
        "properties": {"shape": {"enum": ["circle", "square", "triangle"]}, "count": {"type": "integer"}},
        "required": ["shape", "count"],
        "additionalProperties": False,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(schema, f)
    try:
        want = run_reference(args.binary, args.package, prompt=question, images=[args.image[0]],
                             max_tokens=40, extra=["--json-schema", f.name])
    finally:
        os.unlink(f.name)
    r = client.responses.create(
        model=args.model,
        input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": data_url(args.image[0])},
            {"type": "input_text", "text": question},
        ]}],
        max_output_tokens=40,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "shape", "schema": schema, "strict": True}},
    )
    check("json_schema output = run --json-schema", r.output_text, want)
    if r.status == "completed":
        value = json.loads(r.output_text)
        jsonschema.validate(value, schema)
        check("schema key order", list(value), ["shape", "count"])

    function_calls(client, args, check, question)

    # What a stateless server cannot do, and tools it does not have: 400s naming the field.
    fn_tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    for extra, param in [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"tools": [fn_tool]}, "tool_choice"),
        ({"tools": [fn_tool], "tool_choice": "auto"}, "tool_choice"),
        ({"tools": [fn_tool], "tool_choice": {"type": "function", "name": "g"}}, "tool_choice"),
        ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tools"),
        ({"tools": [fn_tool], "tool_choice": "required",
          "text": {"format": {"type": "json_object"}}}, "tool_choice"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"extra_body": {"response_format": {"type": "json_object"}}}, "response_format"),
        ({"extra_body": {"max_tokens": 5}}, "max_tokens"),
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0]"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}, "input[0].content[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "input[0].content[0]"),
        ({"input": []}, "input"),
    ]:
        kw = {"model": args.model, "input": "hi", "max_output_tokens": 2, **extra}
        try:
            client.responses.create(**kw)
            failures.append(f"{extra} accepted")
        except openai.BadRequestError as e:
            got = e.body.get("param") if isinstance(e.body, dict) else None
            check(f"400 for {extra}", got, param)

    if failures:
        print("FAILED:", ", ".join(failures))
        sys.exit(1)
    print("all Responses API checks passed")


REPORT = {
    "type": "function",
    "name": "report_shape",
    "description": "Report the shape in the picture.",
    "parameters": {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue", "yellow", "purple", "orange"]},
            "count": {"type": "integer", "minimum": 1, "maximum": 2}},
        "required": ["colour", "count"], "additionalProperties": False},
}
NO_ARGS = {"type": "function", "name": "no_args", "parameters": {"type": "object", "additionalProperties": False}}


def function_calls(client, args, check, question):
    """Forced function calls through the Responses API: named and "required", plain and
    streamed, equal to the chat endpoint's forced calls; a conversation that gives a call's
    output back equals the chat endpoint's with the same turns."""
    img = args.image[0]
    user = {"role": "user", "content": [
        {"type": "input_image", "image_url": data_url(img)},
        {"type": "input_text", "text": question},
    ]}
    chat_user = {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(img)}},
        {"type": "text", "text": question},
    ]}
    named = {"type": "function", "name": "report_shape"}
    r = client.responses.create(model=args.model, input=[user], max_output_tokens=100, temperature=0,
                                tools=[REPORT, NO_ARGS], tool_choice=named)
    items = [(o.type, getattr(o, "name", None), getattr(o, "status", None)) for o in r.output]
    check("named call: one function_call item", items, [("function_call", "report_shape", "completed")])
    call = r.output[0]
    jsonschema.validate(json.loads(call.arguments), REPORT["parameters"])
    check("call ids", (call.id.startswith("fc_"), call.call_id.startswith("call_")), (True, True))
    check("tools and tool_choice echoed", (len(r.tools), r.tool_choice.name), (2, "report_shape"))
    chat = client.chat.completions.create(
        model=args.model, messages=[chat_user], max_tokens=100, temperature=0,
        tools=[{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in (REPORT, NO_ARGS)],
        tool_choice={"type": "function", "function": {"name": "report_shape"}})
    check("named call = the chat endpoint's", call.arguments, chat.choices[0].message.tool_calls[0].function.arguments)
    check("usage = the chat's", (r.usage.input_tokens, r.usage.output_tokens),
          (chat.usage.prompt_tokens, chat.usage.completion_tokens))

    # Streamed: the argument deltas add up to the same call, in OpenAI's event order.
    kinds, pieces, done_args, final = [], [], None, None
    for ev in client.responses.create(model=args.model, input=[user], max_output_tokens=100, temperature=0,
                                      tools=[REPORT, NO_ARGS], tool_choice=named, stream=True):
        kinds.append(ev.type)
        if ev.type == "response.function_call_arguments.delta":
            pieces.append(ev.delta)
        if ev.type == "response.function_call_arguments.done":
            done_args = ev.arguments
        if ev.type == "response.completed":
            final = ev.response
    check("named call streamed", ("".join(pieces), done_args), (call.arguments, call.arguments))
    check("streamed final item", final is not None and final.output[0].arguments, call.arguments)
    check("named call stream order", [k for k in kinds if k != "response.function_call_arguments.delta"],
          ["response.created", "response.in_progress", "response.output_item.added",
           "response.function_call_arguments.done", "response.output_item.done", "response.completed"])

    # "required", one call (the grammar then ends within the limit): a call of one of the
    # tools, valid; streamed, the same call.
    schemas = {"report_shape": REPORT["parameters"], "no_args": NO_ARGS["parameters"]}
    required = {"tools": [REPORT, NO_ARGS], "tool_choice": "required", "parallel_tool_calls": False}
    r = client.responses.create(model=args.model, input=[user], max_output_tokens=200, temperature=0, **required)
    calls = [(o.name, o.arguments) for o in r.output if o.type == "function_call"]
    check("required: one function_call item", (r.status, len(calls), len(r.output)), ("completed", 1, 1))
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), schemas[name])
    streamed, final = [], None
    for ev in client.responses.create(model=args.model, input=[user], max_output_tokens=200, temperature=0,
                                      stream=True, **required):
        if ev.type == "response.output_item.done" and ev.item.type == "function_call":
            streamed.append((ev.item.name, ev.item.arguments))
        if ev.type in ("response.completed", "response.incomplete"):
            final = ev.response
    check("required streamed = plain", streamed, calls)
    check("required streamed final", [(o.name, o.arguments) for o in final.output if o.type == "function_call"], calls)

    # The call's output given back: the same turns as the chat endpoint's conversation.
    follow = "Question: how many shapes are there? Answer:"
    r = client.responses.create(model=args.model, max_output_tokens=8, temperature=0, input=[
        user,
        {"type": "function_call", "call_id": "call_1", "name": "report_shape", "arguments": call.arguments},
        {"type": "function_call_output", "call_id": "call_1", "output": "noted"},
        {"role": "user", "content": follow},
    ])
    chat = client.chat.completions.create(model=args.model, max_tokens=8, temperature=0, messages=[
        chat_user,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "report_shape", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "noted"},
        {"role": "user", "content": follow},
    ])
    check("function_call_output turn = the chat's", (r.output_text, r.usage.input_tokens),
          (chat.choices[0].message.content, chat.usage.prompt_tokens))


if __name__ == "__main__":
    main()
