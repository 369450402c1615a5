"""What structured output costs per token in `kosmos-rt serve`: the same image prompt decoded
freely and under constraints, greedy and sampled (temperature 1: the full vocabulary mask every
step, the worst case), by one stream or `--streams N` at once (the engine masks every row).
Not a test: run it by hand on a big package.

    kosmos-rt serve pkg --port 8000 &
    python scripts/bench/structured_cost.py --base-url http://127.0.0.1:8000 --model pkg \
        --image a.png --max-tokens 64 --runs 3

Per request: decode ms/token between the first and the last streamed token (usage's completion
tokens - 1 intervals), so prefill is left out; with several streams, the median stream's. `ignore_eos` keeps unconstrained requests going
to max_tokens; a constrained one ends where its grammar is complete (its tokens are counted).
Modes alternate within each round; medians over rounds.
"""

import argparse
import base64
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx

from sse import chunks

SCHEMA = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "maxLength": 400},
        "objects": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 8},
    },
    "required": ["caption", "objects"],
    "additionalProperties": False,
}

MODES = {
    "free": {},
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}},
    "regex": {"guided_regex": "[a-z ,.]{1,400}"},
}


def one(client, body):
    times, usage = [], {}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for chunk in chunks(r):
            for c in chunk.get("choices", []):
                if c.get("delta", {}).get("content"):
                    times.append(time.perf_counter())
            if chunk.get("usage"):
                usage = chunk["usage"]
    n = usage.get("completion_tokens", len(times))
    return (times[-1] - times[0]) * 1e3 / max(n - 1, 1), n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--streams", type=int, default=1)
    args = ap.parse_args()
    url = "data:image/png;base64," + base64.b64encode(open(args.image, "rb").read()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                              {"type": "text", "text": "Describe the image."}]}]
    results = {}
    with httpx.Client(base_url=args.base_url, timeout=600, limits=httpx.Limits(max_connections=64)) as client, \
            ThreadPoolExecutor(args.streams) as pool:
        for r in range(args.runs + 1):
            for temperature in (0.0, 1.0):
                for mode, extra in MODES.items():
                    body = {"model": args.model, "messages": messages, "max_tokens": args.max_tokens,
                            "temperature": temperature, "seed": r, "stream": True, "ignore_eos": mode == "free",
                            "stream_options": {"include_usage": True}, **extra}
                    bodies = [{**body, "seed": r * 1000 + k} for k in range(args.streams)]
                    each = sorted(pool.map(lambda b: one(client, b), bodies))
                    ms, n = each[len(each) // 2]
                    if r > 0:  # round 0 warms up
                        results.setdefault((mode, temperature), []).append((ms, n))
    print(f"{'mode':12} {'temp':>4} {'ms/token':>9} {'tokens':>7} {'vs free':>8}")
    for (mode, temperature), runs in results.items():
        ms = statistics.median(m for m, _ in runs)
        free = statistics.median(m for m, _ in results[("free", temperature)])
        tokens = statistics.median(n for _, n in runs)
        print(f"{mode:12} {temperature:4.1f} {ms:9.1f} {tokens:7.0f} {ms / free:8.3f}")


if __name__ == "__main__":
    main()
