"""What the prefix cache saves: time to first token of prompts that start like an earlier one.
Not a test: run it by hand against a server, once with the default `--prefix-cache-mb` and once
with `--prefix-cache-mb 0`, and compare.

    kosmos-rt serve pkg --port 8000 &
    python scripts/bench/prefix_cache.py --base-url http://127.0.0.1:8000 --model pkg \
        --image a.png --doc-words 600

One request at a time (nothing else running), each streamed with max_tokens 1:
* image_first / image_again: an image and a question, then the same image with another question
  (the image's slots and the question's start are cached);
* doc_first / doc_again: a long text-only document and a question, then the same document with
  another question (`--doc-words`);
* chat_turn: the document, the first question, its answer and a new question, as a chat's next
  turn sends them;
* doc_again_beside_new: the document with a third question, sent together with a new document
  of the same length (its own nonce): the cached prompt's time to first token when a long
  uncached one arrives at the same moment.
Each run uses a fresh nonce at the start of the prompts, so runs do not reuse each other; the
medians over `--runs` are printed as JSON with the prompt lengths.
"""

import argparse
import base64
import json
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai package ships with

from sse import chunks


def ttft(client, model, messages):
    """Seconds to the first streamed content, the answer, and the prompt's length in tokens."""
    body = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, text, prompt_tokens = None, "", 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for chunk in chunks(r):
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
            for c in chunk["choices"]:
                if c.get("finish_reason") or (c["delta"].get("content")):
                    if first is None:
                        first = time.perf_counter() - t0
                    text += c["delta"].get("content") or ""
    return first, text, prompt_tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--doc-words", type=int, default=600)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with open(args.image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    results, lengths = {}, {}
    with httpx.Client(base_url=args.base_url, timeout=3600) as client:
        for run in range(args.runs):
            nonce = uuid.uuid4().hex[:8]

            def image_q(q):
                return [{"role": "user", "content": [
                    {"type": "text", "text": f"[{nonce}]"},
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": f"Question: {q} Answer:"}]}]

            doc = f"[{nonce}] " + " ".join(f"item{i} is a shape of some colour" for i in range(args.doc_words // 7 + 1))
            cases = {}
            cases["image_first"] = ttft(client, args.model, image_q("what colour is the circle?"))
            cases["image_again"] = ttft(client, args.model, image_q("what shape is on the left?"))
            first_q = [{"role": "user", "content": f"{doc}\nQuestion: which item is red? Answer:"}]
            cases["doc_first"] = ttft(client, args.model, first_q)
            cases["doc_again"] = ttft(client, args.model,
                                      [{"role": "user", "content": f"{doc}\nQuestion: which item is blue? Answer:"}])
            answer = cases["doc_first"][1]
            cases["chat_turn"] = ttft(client, args.model, first_q + [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "Question: and which is green? Answer:"}])
            new_doc = doc.replace(f"[{nonce}]", f"[{uuid.uuid4().hex[:8]}]")
            with ThreadPoolExecutor(2) as pool:
                beside = pool.submit(ttft, client, args.model,
                                     [{"role": "user", "content": f"{doc}\nQuestion: which item is pink? Answer:"}])
                new = pool.submit(ttft, client, args.model,
                                  [{"role": "user", "content": f"{new_doc}\nQuestion: which item is red? Answer:"}])
                cases["doc_again_beside_new"] = beside.result()
                cases["new_doc_beside_cached"] = new.result()
            for k, (t, _, n) in cases.items():
                results.setdefault(k, []).append(t)
                lengths[k] = n
            print(f"run {run}: " + ", ".join(f"{k} {t:.3f} s" for k, (t, _, _) in cases.items()), flush=True)
    print(json.dumps({k: {"ttft_s": round(statistics.median(v), 3), "prompt_tokens": lengths[k]}
                      for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
