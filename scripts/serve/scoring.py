"""Prompt scoring the way lm-evaluation-harness's `local-completions` does it, against
`kosmos-rt serve`, with the numbers checked against the PyTorch reference model
(scripts/oracles/kosmos1_reference.py: transformers CLIP + flamingo-pytorch + torchscale, loaded
from the same checkpoint) and the token ids against Hugging Face `tokenizers` on the package's
tokenizer.json.

The harness finds /tokenizer_info and /tokenize, tokenizes context and continuation through
them, and sends the ids as the prompt with `echo: true, logprobs: 1, max_tokens: 1`; the
continuation's log-likelihood is the sum of `token_logprobs[ctxlen:-1]`, and it is greedy when
each of those equals the largest of its `top_logprobs`.

    python scripts/serve/scoring.py --base-url http://127.0.0.1:8000 --model pkg \
        --package pkg --checkpoint ckpt --image a.png
"""

import argparse
import math
import os
import sys

import httpx2 as httpx  # the HTTP client the openai package ships with
import torch
from tokenizers import Tokenizer

from common import data_url

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "oracles"))
from kosmos1_reference import build_reference, forward  # noqa: E402

TOLERANCE = 1e-4

# (context, continuation) pairs as a multiple-choice task gives them.
PAIRS = [
    ("Question: what colour is the circle? Answer:", " red"),
    ("Question: what colour is the circle? Answer:", " dark blue"),
    ("a green triangle on the left and", " a yellow square on the right"),
    ("Zahl: 数字 ünïcödé, é", " – bytes"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True, help="the server's root, without /v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--package", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--image", required=True)
    args = ap.parse_args()
    client = httpx.Client(base_url=args.base_url, timeout=120)
    failures = []

    def check(what, ok, detail=""):
        print(f"{'ok' if ok else 'FAIL':5} {what}{': ' + str(detail) if detail else ''}")
        if not ok:
            failures.append(what)

    def post(path, body):
        r = client.post(path, json=body)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        return r.json()

    # --- the tokenizer endpoints, against `tokenizers` on the same file ---------------------
    info = client.get("/tokenizer_info").json()
    card = client.get("/v1/models").json()["data"][0]
    ref_tok = Tokenizer.from_file(os.path.join(args.package, "tokenizer.json"))
    bos, eos = ref_tok.token_to_id(info["bos_token"]), ref_tok.token_to_id(info["eos_token"])
    check("tokenizer_info names <s> and </s>", (info["bos_token"], info["eos_token"]) == ("<s>", "</s>"), info)
    check("tokenizer_info context = /v1/models", info["model_max_length"] == card["max_model_len"])

    def tokenize(text, special):
        return post("/tokenize", {"prompt": text, "add_special_tokens": special})["tokens"]

    for text in [c + x for c, x in PAIRS] + [""]:
        want = ref_tok.encode(text, add_special_tokens=False).ids
        check(f"/tokenize {text!r}", tokenize(text, False) == want, want)
        check(f"/tokenize {text!r} with <s>", tokenize(text, True) == [bos] + want)
        got = post("/detokenize", {"tokens": want})["prompt"]
        check(f"/detokenize {text!r}", got == ref_tok.decode(want, skip_special_tokens=True), got)
    # The harness takes the end-of-text id from /tokenize of eos_token.
    check("/tokenize </s> is its id", tokenize(info["eos_token"], False) == [eos])
    strs = post("/tokenize", {"prompt": "a red circle", "return_token_strs": True})
    check("token_strs", strs["token_strs"] == ["<s>", " a", " red", " circle"], strs)

    # /tokenize of messages counts what the chat endpoint feeds (an image is its slots).
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(args.image)}},
        {"type": "text", "text": "Question: what colour is the square? Answer:"},
    ]}]
    counted = post("/tokenize", {"model": args.model, "messages": messages})["count"]
    chat = post("/v1/chat/completions", {"model": args.model, "messages": messages, "max_tokens": 1})
    check("/tokenize messages = chat prompt_tokens", counted == chat["usage"]["prompt_tokens"],
          (counted, chat["usage"]["prompt_tokens"]))

    # --- log-likelihoods, as the harness asks for them --------------------------------------
    prompts, ctxlens = [], []
    for context, continuation in PAIRS:
        # The harness's split: the continuation's ids are those of the whole after the context's.
        ctx = tokenize(context, False)
        whole = tokenize(context + continuation, False)
        prompts.append([bos] + whole)
        ctxlens.append(1 + len(ctx))
    reference = build_reference(args.checkpoint)

    def reference_logprobs(ids):
        """Per position i ≥ 1: log p(ids[i] | ids[:i]) and the largest log p at i."""
        x = torch.tensor([ids])
        logp = forward(reference, None, x, torch.zeros_like(x, dtype=torch.uint8)).float().log_softmax(-1)[0]
        chosen = [None] + [logp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]
        best = [None] + [logp[i - 1].max().item() for i in range(1, len(ids))]
        return chosen, best, logp[-1]

    refs = [reference_logprobs(p) for p in prompts]
    # One continuation the reference itself would pick, so that is_greedy is true once.
    prompts.append(prompts[0] + [int(refs[0][2].argmax())])
    ctxlens.append(len(prompts[0]))
    refs.append(reference_logprobs(prompts[-1]))
    check("the reference's own continuation is greedy for it", abs(refs[-1][0][-1] - refs[-1][1][-1]) <= TOLERANCE)

    for max_tokens in (1, 0):
        # One request for all the pairs: rows of different lengths prefilled together.
        body = {"model": args.model, "prompt": prompts, "temperature": 0, "max_tokens": max_tokens,
                "logprobs": 1, "seed": 1234, "echo": True}
        out = post("/v1/completions", body)
        choices = sorted(out["choices"], key=lambda c: c["index"])
        # Scoring computes every prompt position: nothing comes from the prefix cache.
        check(f"max_tokens {max_tokens}: usage", out["usage"] == {
            "prompt_tokens": sum(map(len, prompts)), "completion_tokens": max_tokens * len(prompts),
            "total_tokens": sum(map(len, prompts)) + max_tokens * len(prompts),
            "prompt_tokens_details": {"cached_tokens": 0}}, out["usage"])
        for k, (choice, ids, ctxlen, (chosen, best, last)) in enumerate(zip(choices, prompts, ctxlens, refs)):
            lp = choice["logprobs"]
            n = len(ids)
            check(f"max_tokens {max_tokens} pair {k}: one entry per prompt token + generated",
                  len(lp["token_logprobs"]) == n + max_tokens, len(lp["token_logprobs"]))
            check(f"max_tokens {max_tokens} pair {k}: the first token has none", lp["token_logprobs"][0] is None)
            worst = max(abs(lp["token_logprobs"][i] - chosen[i]) for i in range(1, n))
            worst_top = max(abs(max(lp["top_logprobs"][i].values()) - best[i]) for i in range(1, n))
            check(f"max_tokens {max_tokens} pair {k}: prompt logprobs = reference", worst <= TOLERANCE, f"{worst:.2e}")
            check(f"max_tokens {max_tokens} pair {k}: top logprob = reference's largest", worst_top <= TOLERANCE,
                  f"{worst_top:.2e}")
            # The harness's parse_logprobs.
            end = n if max_tokens == 0 else -1
            got = sum(lp["token_logprobs"][ctxlen:end])
            want = sum(chosen[ctxlen:n])
            greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:end],
                                                                   lp["top_logprobs"][ctxlen:end]))
            want_greedy = all(abs(chosen[i] - best[i]) <= TOLERANCE for i in range(ctxlen, n))
            check(f"max_tokens {max_tokens} pair {k}: log-likelihood {got:.5f} = reference {want:.5f}",
                  abs(got - want) <= TOLERANCE * (n - ctxlen))
            check(f"max_tokens {max_tokens} pair {k}: is_greedy", greedy == want_greedy, (greedy, want_greedy))
            if max_tokens == 0:
                check(f"max_tokens 0 pair {k}: text is the prompt, finish length",
                      (choice["text"], choice["finish_reason"]) ==
                      (post("/detokenize", {"tokens": ids})["prompt"], "length"))
            else:
                # The generated token is the reference's most likely after the prompt.
                gen = lp["token_logprobs"][n]
                check(f"max_tokens 1 pair {k}: generated the most likely token",
                      math.isclose(gen, last.max().item(), abs_tol=TOLERANCE), (gen, last.max().item()))

    # vLLM's prompt_logprobs (no echo): per prompt token {id: {logprob, rank, decoded_token}} for
    # the token and the k most likely; the logprobs are the reference's, the ranks those of its
    # distribution (any order among logits within the tolerance of the token's).
    def reference_ranks(ids):
        x = torch.tensor([ids])
        logp = forward(reference, None, x, torch.zeros_like(x, dtype=torch.uint8)).float().log_softmax(-1)[0]
        # (fewest more likely, most): the second counts the token itself, as its 1 + would.
        return [None] + [(1 + int((logp[i - 1] > logp[i - 1, t] + TOLERANCE).sum()),
                          int((logp[i - 1] > logp[i - 1, t] - TOLERANCE).sum()))
                         for i, t in enumerate(ids) if i > 0]

    out = post("/v1/completions", {"model": args.model, "prompt": prompts, "temperature": 0, "max_tokens": 1,
                                   "prompt_logprobs": 2})
    for k, (choice, ids, (chosen, best, _)) in enumerate(zip(sorted(out["choices"], key=lambda c: c["index"]),
                                                              prompts, refs)):
        pl, n = choice["prompt_logprobs"], len(ids)
        check(f"prompt_logprobs pair {k}: one entry per prompt token, the first null",
              len(pl) == n and pl[0] is None, len(pl))
        own = [pl[i][str(ids[i])] for i in range(1, n)]
        worst = max(abs(o["logprob"] - chosen[i + 1]) for i, o in enumerate(own))
        check(f"prompt_logprobs pair {k}: = reference", worst <= TOLERANCE, f"{worst:.2e}")
        worst_top = max(abs(max(v["logprob"] for v in pl[i].values()) - best[i]) for i in range(1, n))
        check(f"prompt_logprobs pair {k}: the most likely = reference's", worst_top <= TOLERANCE, f"{worst_top:.2e}")
        ranks = reference_ranks(ids)
        bad = [(i, o["rank"], ranks[i + 1]) for i, o in enumerate(own)
               if not ranks[i + 1][0] <= o["rank"] <= ranks[i + 1][1]]
        check(f"prompt_logprobs pair {k}: ranks = reference's", not bad, bad[:3])
        check(f"prompt_logprobs pair {k}: 2 alternatives + the token",
              all(len(pl[i]) == (2 if pl[i][str(ids[i])]["rank"] <= 2 else 3) for i in range(1, n)))
        check(f"prompt_logprobs pair {k}: each entry's decoded token",
              all(isinstance(v["decoded_token"], str) for i in range(1, n) for v in pl[i].values()))
        check(f"prompt_logprobs pair {k}: no completions logprobs asked, none given", choice["logprobs"] is None)

    # A chat's prompt_logprobs: once, beside the choices, over the ids /tokenize gives for it.
    text_chat = [{"role": "user", "content": PAIRS[2][0]}]
    ids = post("/tokenize", {"model": args.model, "messages": text_chat})["tokens"]
    out = post("/v1/chat/completions", {"model": args.model, "messages": text_chat, "max_tokens": 1,
                                        "prompt_logprobs": 0})
    pl = out["prompt_logprobs"]
    chosen = reference_logprobs(ids)[0]
    check("chat prompt_logprobs: one per prompt token", len(pl) == len(ids) == out["usage"]["prompt_tokens"],
          (len(pl), len(ids)))
    worst = max(abs(pl[i][str(ids[i])]["logprob"] - chosen[i]) for i in range(1, len(ids)))
    check("chat prompt_logprobs = reference", worst <= TOLERANCE, f"{worst:.2e}")
    # With an image: its slots are embeddings, not tokens: null like the first.
    out = post("/v1/chat/completions", {"model": args.model, "messages": messages, "max_tokens": 1,
                                        "prompt_logprobs": 1})
    nulls = sum(e is None for e in out["prompt_logprobs"])
    check("chat prompt_logprobs with an image: the first token and the image slots null",
          len(out["prompt_logprobs"]) == out["usage"]["prompt_tokens"] and nulls > 1, nulls)

    # Ids are fed as given: without <s> the first id is the one with no context.
    bare = prompts[0][1:]
    out = post("/v1/completions", {"model": args.model, "prompt": bare, "max_tokens": 0, "echo": True, "logprobs": 0})
    lp = out["choices"][0]["logprobs"]
    check("token prompt without <s>: no <s> added", len(lp["tokens"]) == len(bare) and lp["token_logprobs"][0] is None,
          lp["tokens"][:3])

    # Generation from ids equals generation from the text they encode, with more stop strings
    # than OpenAI's 4 (the harness sends its own plus end-of-text).
    text = PAIRS[0][0]
    stops = ["\n\n", "Question:", "</s>", "<|im_end|>", "<|endoftext|>"]
    a = post("/v1/completions", {"model": args.model, "prompt": [bos] + tokenize(text, False), "max_tokens": 8,
                                 "temperature": 0, "stop": stops})
    b = post("/v1/completions", {"model": args.model, "prompt": text, "max_tokens": 8, "temperature": 0,
                                 "stop": stops})
    check("ids [<s>] + tokenize(text) generate what text does", a["choices"][0]["text"] == b["choices"][0]["text"],
          (a["choices"][0]["text"], b["choices"][0]["text"]))

    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("prompt scoring matches the reference model and tokenizer")


if __name__ == "__main__":
    main()
