"""Load test of `kosmos-rt serve` on loopback: many concurrent clients, mixed image / text,
plain / streaming, some streams dropped mid-way. Every answer that was not dropped must equal
`kosmos-rt run` (greedy); no 5xx; the server's memory after the run stays within a small margin
of its memory after a warm-up; `/metrics` counts add up; dropped streams free their KV rows.

    python scripts/serve/load_test.py --base-url http://127.0.0.1:8000 --server-pid PID \
        --binary target/debug/kosmos-rt --package pkg --model tiny --image a.png --image b.png
"""

import argparse
import asyncio
import json
import sys
import time

import httpx2 as httpx  # the HTTP client the openai package ships with

from common import data_url, metric_sum, parse_metrics, rss_kb, run_reference

QUESTION = "Question: what colour is the circle? Answer:"
TEXTS = ["a red circle on the left and", "a green", "two"]


def catalogue(args):
    """(request body, expected text) for every distinct request of the run."""
    items = []
    for img in args.image:
        url = data_url(img)
        items.append(
            (
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}], "max_tokens": 12},
                run_reference(args.binary, args.package, images=[img], max_tokens=12),
                "chat",
            )
        )
        items.append(
            (
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
                        }
                    ],
                    "max_tokens": 6,
                },
                run_reference(args.binary, args.package, prompt=QUESTION, images=[img], max_tokens=6),
                "chat",
            )
        )
    for t in TEXTS:
        items.append(({"prompt": t, "max_tokens": 8}, run_reference(args.binary, args.package, prompt=t, max_tokens=8), "completion"))
    return items


async def one(client, args, item, mode, stats):
    body, want, kind = item
    body = {**body, "model": args.model, "temperature": 0}
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    if mode == "plain":
        r = await client.post(path, json=body)
        stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
        if r.status_code != 200:
            stats["errors"].append(f"{path}: {r.status_code} {r.text[:200]}")
            return
        c = r.json()["choices"][0]
        got = c["message"]["content"] if kind == "chat" else c["text"]
    else:
        pieces = []
        async with client.stream("POST", path, json={**body, "stream": True}) as r:
            stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
            if r.status_code != 200:
                stats["errors"].append(f"{path} stream: {r.status_code}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    stats["errors"].append(f"stream error: {chunk}")
                    return
                for c in chunk["choices"]:
                    piece = c.get("delta", {}).get("content") if kind == "chat" else c.get("text")
                    if piece:
                        pieces.append(piece)
                if mode == "cancel" and pieces:
                    stats["cancelled"] += 1
                    return  # leaving the block closes the connection mid-stream
        got = "".join(pieces)
    if got.strip() != want.strip():
        stats["errors"].append(f"wrong answer ({mode}): got {got!r}, want {want!r}")
    else:
        stats["correct"] += 1


async def drive(args, items, total, clients, stats):
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=300, limits=limits) as client:
        counter = iter(range(total))

        async def worker():
            for i in counter:
                mode = "cancel" if i % 10 == 3 else "stream" if i % 3 == 0 else "plain"
                await one(client, args, items[i % len(items)], mode, stats)

        await asyncio.gather(*(worker() for _ in range(clients)))


async def metrics(args):
    async with httpx.AsyncClient(base_url=args.base_url) as client:
        return parse_metrics((await client.get("/metrics")).text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--server-pid", type=int, required=True)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--package", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", action="append", required=True)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=520)
    ap.add_argument("--warmup", type=int, default=64)
    ap.add_argument("--rss-margin-mb", type=float, default=32)
    args = ap.parse_args()
    items = catalogue(args)

    def fresh():
        return {"status": {}, "errors": [], "correct": 0, "cancelled": 0}

    warm = fresh()
    asyncio.run(drive(args, items, args.warmup, args.clients, warm))
    time.sleep(0.5)
    rss_warm = rss_kb(args.server_pid)
    stats = fresh()
    t0 = time.time()
    asyncio.run(drive(args, items, args.requests, args.clients, stats))
    elapsed = time.time() - t0
    # Dropped streams are noticed at the engine's next step; give it a moment to go idle.
    for _ in range(100):
        m = asyncio.run(metrics(args))
        if metric_sum(m, "kosmos_active_sequences") == 0 and metric_sum(m, "kosmos_queue_depth") == 0:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    rss_after = rss_kb(args.server_pid)

    failures = list(warm["errors"]) + list(stats["errors"])
    sent = args.warmup + args.requests
    answered = stats["correct"] + stats["cancelled"]
    print(
        f"{args.requests} requests from {args.clients} clients in {elapsed:.1f} s "
        f"({args.requests / elapsed:.1f} req/s): {stats['correct']} correct, {stats['cancelled']} dropped mid-stream, "
        f"status {stats['status']}"
    )
    if answered != args.requests:
        failures.append(f"{args.requests - answered} requests neither correct nor cancelled")
    for s, n in {**warm["status"], **stats["status"]}.items():
        if s != 200:
            failures.append(f"{n} responses with status {s}")
    print(f"RSS after warm-up {rss_warm / 1024:.1f} MB, after the run {rss_after / 1024:.1f} MB")
    if (rss_after - rss_warm) / 1024 > args.rss_margin_mb:
        failures.append(f"RSS grew {(rss_after - rss_warm) / 1024:.1f} MB over the run (margin {args.rss_margin_mb} MB)")

    # /metrics adds up.
    responses = sum(
        metric_sum(m, "kosmos_requests_total", endpoint=e, status="200") for e in ("/v1/chat/completions", "/v1/completions")
    )
    finished = metric_sum(m, "kosmos_sequences_finished_total")
    cancelled = metric_sum(m, "kosmos_sequences_finished_total", reason="cancelled")
    print(f"metrics: {responses:.0f} 200-responses, {finished:.0f} sequences finished ({cancelled:.0f} cancelled)")
    if responses < sent:
        failures.append(f"/metrics counts {responses} successful responses, {sent} were sent")
    if finished != responses:
        failures.append(f"{finished} sequences finished but {responses} requests answered")
    if not 0 < cancelled <= stats["cancelled"] + warm["cancelled"]:
        failures.append(f"{cancelled} cancelled sequences counted, {stats['cancelled'] + warm['cancelled']} streams dropped")
    for gauge in ("kosmos_active_sequences", "kosmos_queue_depth", "kosmos_kv_slots_used"):
        if metric_sum(m, gauge) != 0:
            failures.append(f"{gauge} is {metric_sum(m, gauge)} after the run")
    # The prompts repeat, so the prefix cache served part of them (and the answers above are
    # still kosmos-rt run's).
    reused = metric_sum(m, "kosmos_prefix_cache_hit_tokens_total")
    print(f"prefix cache: {reused:.0f} prompt tokens reused, {metric_sum(m, 'kosmos_prefix_cache_bytes') / 2**20:.1f} MiB held")
    if reused <= 0:
        failures.append("no prompt token came from the prefix cache")
    ttft = metric_sum(m, "kosmos_time_to_first_token_seconds_count")
    if ttft < finished - cancelled:
        failures.append(f"{ttft} first tokens timed for {finished - cancelled} finished sequences")

    if failures:
        print("FAILED:\n  " + "\n  ".join(failures[:20]))
        sys.exit(1)
    print("load test passed")


if __name__ == "__main__":
    main()
