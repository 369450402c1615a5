"""What `logits_to_keep` saves in a prefill: one decoder call over a text prompt with every
position's logits (0, what the decoder did before the input existed) or the last one's (1, what
kosmos-rt asks for). Not a test: run it by hand on a big package, each setting in its own process
so that peak RSS is its own.

    python scripts/bench/prefill_logits.py pkg --batch 4 --tokens 512 --keep 0 --runs 3
    python scripts/bench/prefill_logits.py pkg --batch 4 --tokens 512 --keep 1 --runs 3

Prints one JSON line: median and per-run prefill ms, the logits' shape and bytes, peak RSS.
Needs a portable- or ort-profile package with the concat or buffer KV layout.
"""

import argparse
import json
import resource
import statistics
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("package")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--keep", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()

    man = json.load(open(f"{a.package}/kosmos_rt.json"))
    d = man["decoder"]
    if "logits_to_keep" not in d["inputs"]:
        raise SystemExit(f"{a.package}: this decoder has no logits_to_keep input (re-export it)")
    so = ort.SessionOptions()
    sess = ort.InferenceSession(f"{a.package}/{d['file']}", so, providers=["CPUExecutionProvider"])
    b, s = a.batch, a.tokens
    rng = np.random.default_rng(0)
    kv = np.float16 if d["kv_dtype"] == "float16" else np.float32
    buffer = d.get("kv_cache", "concat") == "buffer"
    feed = {
        "input_ids": rng.integers(6, d["vocab_size"], (b, s), dtype=np.int64),
        "image_embeds": np.zeros((b, 1, d["hidden_size"]), np.float32),
        "image_mask": np.zeros((b, s), bool),
        "attention_mask": np.ones((b, s), np.int64),
        "logits_to_keep": np.array(a.keep, np.int64),
    }
    if buffer:
        feed["past_sequence_length"] = np.zeros(b, np.int64)
    past = s if buffer else 0
    for i in range(d["num_layers"]):
        for part in ("key", "value"):
            feed[f"past_key_values.{i}.{part}"] = np.zeros((b, d["num_heads"], past, d["head_dim"]), kv)
    times, shape = [], None
    for _ in range(a.runs + 1):  # the first run warms up
        t0 = time.perf_counter()
        logits = sess.run(["logits"], feed)[0]
        times.append((time.perf_counter() - t0) * 1e3)
        shape = logits.shape
        del logits
    runs = times[1:]
    print(json.dumps({
        "batch": b,
        "tokens": s,
        "logits_to_keep": a.keep,
        "prefill_ms_median": round(statistics.median(runs), 1),
        "prefill_ms": [round(t, 1) for t in runs],
        "logits_shape": list(shape),
        "logits_mb": round(int(np.prod(shape)) * 4 / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
