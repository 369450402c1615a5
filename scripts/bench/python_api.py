#!/usr/bin/env python3
"""What the Python bindings cost: decode time per token through `kosmos_rt.Model.stream` and
requests/s through `kosmos_rt.Engine`, to set beside `kosmos-rt bench` on the same package.

    PYTHONPATH=python .venv/bin/python scripts/bench/python_api.py PACKAGE IMAGE [--new-tokens 32]

Prints one JSON object: per `Model.stream` generation of --new-tokens tokens (ignoring `</s>`)
the median time to the first text and in all (`model_first_text_s`, `model_total_s`), and
for the engine at batch 4 `engine_tokens_per_s`. The prompt is `kosmos-rt bench`'s shape: an
image and about 32 words.
"""

import argparse
import json
import statistics
import time

import kosmos_rt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("package")
    ap.add_argument("image")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    prompt = "<image> " + " ".join(["describe the picture in detail"] * 6)
    settings = {"max_tokens": args.new_tokens, "ignore_eos": True}

    out = {"package": args.package, "new_tokens": args.new_tokens}
    with kosmos_rt.Model(args.package) as model:
        model.generate(prompt, [args.image], max_tokens=2)  # warm-up
        totals, firsts = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            first = None
            for _ in model.stream(prompt, [args.image], **settings):
                first = first or time.perf_counter() - start
            totals.append(time.perf_counter() - start)
            firsts.append(first)
        out["model_first_text_s"] = statistics.median(firsts)
        out["model_total_s"] = statistics.median(totals)
    with kosmos_rt.Engine(args.package, max_batch=4) as engine:
        engine.generate(prompt, [args.image], max_tokens=2)
        rates = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            done = [r.result() for r in [engine.submit(prompt, [args.image], **settings) for _ in range(4)]]
            rates.append(sum(c.generated_tokens for c in done) / (time.perf_counter() - start))
        out["engine_batch"] = 4
        out["engine_tokens_per_s"] = statistics.median(rates)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
