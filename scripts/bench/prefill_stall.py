"""How long a long prompt's prefill stalls the streams `kosmos-rt serve` is already decoding, and
what it costs that prompt's time to first token. Not a test: run it by hand against a server
started with the `--prefill-chunk` under study (0 = whole prefills), and compare.

    kosmos-rt serve pkg --port 8000 --max-batch 8 --prefill-chunk 0 &
    python scripts/bench/prefill_stall.py --base-url http://127.0.0.1:8000 --model pkg \
        --image a.png --decoders 2 --long-words 400 --runs 3

Per run: `--decoders` streams (image + short prompt, greedy, ignore_eos) start; once all of them
are decoding, one long text-only prompt is sent. Reported per run and as medians over runs:
* stall_s: the longest gap between consecutive tokens of any decoding stream while the long
  prompt was being prefilled (from its send to its first token);
* steady_itl_s: those streams' median gap before the long prompt arrived;
* long_ttft_s: the long prompt's time to first token;
* decoded_during: tokens the decoding streams produced during that prefill;
* itl_with_long_s: the decoding streams' median gap while the long prompt decodes beside them
  (from its first token to its last; `--long-tokens` sets how long), when every decode step
  spans its context;
* long_prompt_tokens: the long prompt's length in tokens;
* gaps_during_s (per run): the first stream's gaps overlapping the prefill, in order.
"""

import argparse
import asyncio
import base64
import json
import statistics
import time
import uuid

import httpx2 as httpx  # the HTTP client the openai package ships with
from serve_streams import stream_chat


async def one_run(args, image_url):
    short = {
        "model": args.model,
        "max_tokens": args.decode_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": "Question: what colour is the circle? Answer:"},
        ]}],
    }
    # Distinct words so the prompt is many tokens, and a fresh nonce first so that nothing of it
    # is in the prefix cache from an earlier run.
    words = f"[{uuid.uuid4().hex[:8]}] " + " ".join(f"word{i} shape colour" for i in range(args.long_words // 3 + 1))
    long = {
        "model": args.model,
        "max_tokens": args.long_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": words}],
    }
    async with httpx.AsyncClient(base_url=args.base_url, timeout=3600) as client:
        events = [asyncio.Event() for _ in range(args.decoders)]
        tasks = [asyncio.create_task(stream_chat(client, short, e.set)) for e in events]
        for e in events:
            await e.wait()
        await asyncio.sleep(args.settle)
        sent = time.perf_counter()
        long_times, usage = await stream_chat(client, long)
        first, last = long_times[0], long_times[-1]
        times = [t for t, _ in await asyncio.gather(*tasks)]
    steady, stall, during, beside = [], 0.0, 0, []
    # The first stream's gaps that overlap the prefill, in order (chunk by chunk).
    gaps_during = [round(b - a, 2) for a, b in zip(times[0], times[0][1:]) if b > sent and a < first]
    for t in times:
        gaps = list(zip(t, t[1:]))
        steady += [b - a for a, b in gaps if b < sent]
        beside += [b - a for a, b in gaps if a >= first and b <= last]
        inside = [b - a for a, b in gaps if b > sent and a < first]
        stall = max([stall] + inside)
        during += sum(1 for x in t if sent < x <= first)
    return {
        "stall_s": stall,
        "steady_itl_s": statistics.median(steady) if steady else float("nan"),
        "long_ttft_s": first - sent,
        "itl_with_long_s": statistics.median(beside) if beside else float("nan"),
        "decoded_during": during,
        "long_prompt_tokens": usage.get("prompt_tokens", 0),
        "gaps_during_s": gaps_during,
    }


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--decoders", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=160)
    ap.add_argument("--long-words", type=int, default=400)
    ap.add_argument("--long-tokens", type=int, default=4, help="tokens the long prompt generates")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of decoding before the long prompt")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    image_url = "data:image/png;base64," + base64.b64encode(open(args.image, "rb").read()).decode()
    runs = []
    for i in range(args.runs):
        r = await one_run(args, image_url)
        print(json.dumps({"run": i, **{k: v if isinstance(v, list) else round(v, 3) for k, v in r.items()}}), flush=True)
        runs.append(r)
    summary = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0] if k != "gaps_during_s"}
    print(json.dumps({"median": summary}))


if __name__ == "__main__":
    asyncio.run(main())
