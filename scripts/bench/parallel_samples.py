"""What sharing one prefill between identical prompts saves: the wall time of a completions
request for `n` samples of one prompt, against `n` different prompts of the same length sent at
once (what `n` samples cost when each is prefilled) and one sample alone. Not a test: run it by
hand against a server started with `--prefix-cache-mb 0`, so that nothing comes from the prefix
cache, and nothing else running.

    kosmos-rt serve pkg --port 8000 --prefix-cache-mb 0 &
    python scripts/bench/parallel_samples.py --base-url http://127.0.0.1:8000 --model pkg --n 4

Each request generates one token (`max_tokens` 1), so its time is the prefill's. Every run puts
a fresh nonce first; the medians over `--runs` are printed as JSON.
"""

import argparse
import json
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai package ships with


def complete(client, model, prompt, n, seed):
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 1.0, "n": n, "seed": seed}
    r = client.post("/v1/completions", json=body)
    r.raise_for_status()
    return r.json()["usage"]["prompt_tokens"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--doc-words", type=int, default=150)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results, prompt_tokens = {}, 0
    with httpx.Client(base_url=args.base_url, timeout=3600) as client, ThreadPoolExecutor(args.n) as pool:
        for run in range(args.runs):
            def doc(tag):
                body = " ".join(f"item{i} is a shape of some colour" for i in range(args.doc_words // 7 + 1))
                return f"[{tag}] {body}\nQuestion: which item is red? Answer:"
            cases = {}
            t0 = time.perf_counter()
            prompt_tokens = complete(client, args.model, doc(uuid.uuid4().hex[:8]), 1, run)
            cases["one_sample"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            complete(client, args.model, doc(uuid.uuid4().hex[:8]), args.n, run)
            cases[f"n{args.n}_one_prompt"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            tags = [uuid.uuid4().hex[:8] for _ in range(args.n)]
            list(pool.map(lambda t: complete(client, args.model, doc(t), 1, run), tags))
            cases[f"{args.n}_different_prompts"] = time.perf_counter() - t0
            for k, t in cases.items():
                results.setdefault(k, []).append(t)
            print(f"run {run}: " + ", ".join(f"{k} {t:.3f} s" for k, t in cases.items()), flush=True)
    print(json.dumps({"prompt_tokens": prompt_tokens,
                      **{k: round(statistics.median(v), 3) for k, v in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
