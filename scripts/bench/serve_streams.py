"""Aggregate decode throughput of `kosmos-rt serve` with 1 and with N concurrent streams (issue:
N = 8 should give ≥ 5x one stream). Not a test: run it by hand on a big package and quote it.

    kosmos-rt serve pkg --port 8000 --max-batch 8 &
    python scripts/bench/serve_streams.py --base-url http://127.0.0.1:8000 --model pkg \
        --image a.png --streams 1 --streams 8 --max-tokens 64 --runs 3

Every request streams a chat completion (image + prompt, greedy, `ignore_eos` so all streams
generate the same number of tokens). Per run:
* decode tokens/s (steady state): text chunks (one per token, but for byte-fallback pieces) of all
  streams between the moment the last stream got its first token and the moment the first stream
  ended, over that window: every stream is decoding, nobody is in prefill;
* first-to-last tokens/s: tokens after each stream's first / (last token of any stream - first
  token of any stream): includes prefills of streams admitted later, which stall decoding;
* end-to-end tokens/s: all tokens / wall time of the run.
Runs alternate between the stream counts; medians over runs, and the median of per-round ratios.
"""

import argparse
import asyncio
import base64
import json
import statistics
import time

import httpx2 as httpx  # the HTTP client the openai package ships with


async def stream_chat(client, body, on_text=None):
    """Stream one chat completion; returns the arrival time of each text chunk and the usage
    (when the server sends it). `on_text()` is called at each text chunk."""
    times, usage = [], {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices", []):
                if c.get("delta", {}).get("content"):
                    times.append(time.perf_counter())
                    if on_text is not None:
                        on_text()
            if chunk.get("usage"):
                usage = chunk["usage"]
    return times, usage


async def one_stream(client, body):
    times, usage = await stream_chat(client, body)
    return times, usage.get("completion_tokens", 0)


async def run(args, streams, body):
    async with httpx.AsyncClient(base_url=args.base_url, timeout=3600) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_stream(client, body) for _ in range(streams)))
        wall = time.perf_counter() - t0
    # Steady state: from the moment every stream has its first token until the first stream
    # ends, all of them decode together; count the text chunks each produced in that window.
    start = max(r[0][0] for r in res)
    end = min(r[0][-1] for r in res)
    chunks = sum(sum(1 for t in r[0] if start < t <= end) for r in res)
    first = min(r[0][0] for r in res)
    last = max(r[0][-1] for r in res)
    return {
        "decode_tok_s": chunks / (end - start) if end > start else float("nan"),
        "decode_window_s": end - start,
        "first_to_last_tok_s": sum(r[1] - 1 for r in res) / (last - first),
        "e2e_tok_s": sum(r[1] for r in res) / wall,
        "ttft_s": statistics.median(r[0][0] - t0 for r in res),
        "tokens": [r[1] for r in res],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", default="Describe the picture in detail:")
    ap.add_argument("--streams", type=int, action="append")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with open(args.image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    body = {
        "model": args.model,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": args.prompt}]}
        ],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    asyncio.run(run(args, 1, {**body, "max_tokens": 4}))  # warm-up (vision cache, allocations)
    counts = args.streams or [1, 8]
    # Interleaved (1, 8, 1, 8, ...) so that drift in the machine's speed hits both alike; the
    # ratio is taken per round, then the median.
    runs = {n: [] for n in counts}
    for _ in range(args.runs):
        for n in counts:
            runs[n].append(asyncio.run(run(args, n, body)))
    results = {}
    for n in counts:
        rs = runs[n]
        results[n] = {
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
            "e2e_tok_s": statistics.median(r["e2e_tok_s"] for r in rs),
            "first_to_last_tok_s": statistics.median(r["first_to_last_tok_s"] for r in rs),
            "decode_window_s": statistics.median(r["decode_window_s"] for r in rs),
            "ttft_s": statistics.median(r["ttft_s"] for r in rs),
            "runs_decode_tok_s": [round(r["decode_tok_s"], 2) for r in rs],
        }
        print(json.dumps({"streams": n, **results[n]}), flush=True)
    base = counts[0]
    for n in counts[1:]:
        per_round = [b["decode_tok_s"] / a["decode_tok_s"] for a, b in zip(runs[base], runs[n])]
        print(
            f"{n} streams vs {base}: steady-state decode {statistics.median(per_round):.2f}x "
            f"(median of per-round ratios {[round(x, 2) for x in per_round]}), "
            f"end-to-end {results[n]['e2e_tok_s'] / results[base]['e2e_tok_s']:.2f}x"
        )


if __name__ == "__main__":
    main()
