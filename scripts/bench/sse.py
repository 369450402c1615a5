"""The chunks of an OpenAI server-sent-event stream, shared by the benchmark scripts."""

import json


def chunks(response):
    """Each `data:` chunk of a streamed completion (an httpx streaming response), parsed, up to
    `[DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        yield json.loads(line[6:])
