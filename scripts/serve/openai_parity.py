"""The official `openai` client against `kosmos-rt serve` (DESIGN §7 step 6): chat with an image
(plain and streaming), completions (plain and streaming), logprobs in both shapes, echo, models,
penalties, seeded n, logit_bias / min_p / min_tokens / stop_token_ids, the prefix cache's
cached_tokens; greedy answers must equal `kosmos-rt run` on the same inputs.

    python scripts/serve/openai_parity.py --base-url http://127.0.0.1:8000/v1 \
        --binary target/debug/kosmos-rt --package pkg --image a.png --image b.png
"""

import math
import sys

import httpx2 as httpx  # the HTTP client the openai package ships with
import openai

from common import checker, client_args, data_url, metric_sum, parse_metrics, run_reference


def main():
    args = client_args(__doc__)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    failures = []

    check = checker(failures)

    models = client.models.list()
    ids = [m.id for m in models.data]
    check("models", ids, [args.model])

    question = "Question: what colour is the square? Answer:"
    for img in args.image:
        want_caption = run_reference(args.binary, args.package, images=[img], max_tokens=16)
        r = client.chat.completions.create(
            model=args.model,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}}]}],
            max_tokens=16,
            temperature=0,
        )
        check(f"chat caption {img}", r.choices[0].message.content.strip(), want_caption)
        assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0, r.usage
        if img == args.image[0]:
            check("cached_tokens of the first chat", r.usage.prompt_tokens_details.cached_tokens, 0)
            # The same chat again: the prefix cache gives all of its prompt but the last token.
            again = client.chat.completions.create(
                model=args.model,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}}]}],
                max_tokens=16,
                temperature=0,
            )
            check("chat caption again", again.choices[0].message.content.strip(), want_caption)
            check("cached_tokens of a repeated chat", again.usage.prompt_tokens_details.cached_tokens,
                  again.usage.prompt_tokens - 1)

        want_vqa = run_reference(args.binary, args.package, prompt=question, images=[img], max_tokens=8)
        stream = client.chat.completions.create(
            model=args.model,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(img)}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage, roles = [], None, None, 0
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.role:
                    roles += 1
                if c.delta.content:
                    pieces.append(c.delta.content)
                if c.finish_reason:
                    finish = c.finish_reason
        check(f"chat stream VQA {img}", "".join(pieces).strip(), want_vqa)
        assert roles == 1, f"expected one role delta, got {roles}"
        assert finish in ("stop", "length"), finish
        assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # logprobs as the client parses them: one entry per generated token, the greedy token the
    # most likely of its alternatives, a stream's entries those of the plain answer.
    # (tests/batching.rs checks the values against the trainer's log-softmax.)
    img_question = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(args.image[0])}},
                {"type": "text", "text": question},
            ],
        }
    ]
    kw = dict(model=args.model, messages=img_question, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    plain = [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in content]
    check("chat logprobs entries", len(content), r.usage.completion_tokens)
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0, t
        assert (t.token, t.logprob) == (t.top_logprobs[0].token, t.top_logprobs[0].logprob), t
        assert bytes(t.bytes) == t.token.encode() or t.token.startswith("bytes:"), t
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1 + 1e-5, t
    streamed = []
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                streamed += [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in c.logprobs.content]
    check("chat logprobs stream = plain", streamed, plain)
    r = client.chat.completions.create(model=args.model, messages=img_question, max_tokens=2, temperature=0)
    check("no logprobs unless asked", r.choices[0].logprobs, None)

    text = "a red circle on the left and"
    lp_kw = dict(model=args.model, prompt=text, max_tokens=6, temperature=0, logprobs=2)
    r = client.completions.create(**lp_kw)
    lp = r.choices[0].logprobs
    check("completion logprobs entries", len(lp.tokens), r.usage.completion_tokens)
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(lp.tokens), lp
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0, lp.text_offset
    for v, alts in zip(lp.token_logprobs, lp.top_logprobs):
        assert v <= 0 and max(alts.values()) == v, (v, alts)
    # Each plain-text token starts where text_offset says (the text drops the first word's space).
    full = r.choices[0].text
    for t, o in zip(lp.tokens, lp.text_offset):
        if not t.startswith(("<", "bytes:")):
            assert full[o:].startswith(t.lstrip(" ") if o == 0 else t), (t, o, full)
    assert all(o <= len(full) for o in lp.text_offset), (lp.text_offset, full)
    offsets = []
    for c in client.completions.create(**lp_kw, stream=True):
        if c.choices and c.choices[0].logprobs:
            offsets += c.choices[0].logprobs.text_offset
    check("completion stream text_offset", offsets, lp.text_offset)

    # echo: the prompt first, its tokens scored too (the first has no context: null).
    # (tests/batching.rs checks the prompt's values against the trainer's log-softmax.)
    echo_kw = dict(model=args.model, prompt=text, max_tokens=3, temperature=0, echo=True, logprobs=1)
    r = client.completions.create(**echo_kw)
    plain = client.completions.create(model=args.model, prompt=text, max_tokens=3, temperature=0)
    check("echo text", r.choices[0].text, text + plain.choices[0].text)
    lp = r.choices[0].logprobs
    check("echo entries", len(lp.tokens), r.usage.prompt_tokens + r.usage.completion_tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:]), lp.token_logprobs
    assert lp.text_offset == sorted(lp.text_offset), lp.text_offset
    check("echo completion offset", lp.text_offset[r.usage.prompt_tokens], len(text))
    streamed = "".join(c.choices[0].text for c in client.completions.create(**echo_kw, stream=True) if c.choices)
    check("echo stream", streamed, r.choices[0].text)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=args.model, prompt=text, max_tokens=3, temperature=0, echo=True, stream=True)
        if c.choices
    )
    check("echo stream without logprobs", streamed, r.choices[0].text)

    want = run_reference(args.binary, args.package, prompt=text, max_tokens=10)
    r = client.completions.create(model=args.model, prompt=text, max_tokens=10, temperature=0)
    check("completion", r.choices[0].text.strip(), want)
    s = client.completions.create(model=args.model, prompt=text, max_tokens=10, temperature=0, stream=True)
    check("completion stream", "".join(c.choices[0].text for c in s if c.choices).strip(), want)

    # OpenAI's penalties (generated tokens only) as `kosmos-rt run` applies them.
    want = run_reference(
        args.binary, args.package, prompt=text, max_tokens=12,
        extra=["--presence-penalty", "0.7", "--frequency-penalty", "1.5"],
    )
    r = client.completions.create(
        model=args.model, prompt=text, max_tokens=12, temperature=0, presence_penalty=0.7, frequency_penalty=1.5
    )
    check("completion with presence/frequency penalties", r.choices[0].text.strip(), want)
    plain = run_reference(args.binary, args.package, prompt=text, max_tokens=12)
    if want == plain:
        failures.append("penalties changed nothing: the check cannot tell them from none")

    # n choices with a seed: reproducible, and each its own sample.
    kw = dict(model=args.model, prompt=text, max_tokens=8, temperature=1.0, seed=5, n=3)
    a = [c.text for c in client.completions.create(**kw).choices]
    b = [c.text for c in client.completions.create(**kw).choices]
    check("seeded n=3 reproducible", a, b)
    assert len(a) == 3
    # Choice j is `kosmos-rt run` with seed + j, though the three share one prefill.
    for j, got in enumerate(a):
        want = run_reference(args.binary, args.package, prompt=text, max_tokens=8,
                             extra=["--temperature", "1.0", "--seed", str(5 + j)])
        check(f"n=3 choice {j} equals run --seed {5 + j}", got.strip(), want)
    metrics = parse_metrics(httpx.get(args.base_url.removesuffix("/v1") + "/metrics",
                                      headers={"Authorization": f"Bearer {args.api_key}"}).text)
    if metric_sum(metrics, "kosmos_shared_prefill_tokens_total") <= 0:
        failures.append("the n=3 choices did not share their prefill")

    # vLLM's truncate_prompt_tokens: the last k tokens of `<s> text`, as if sent as token ids;
    # with -1 (the context) nothing is cut.
    ids = httpx.post(args.base_url.removesuffix("/v1") + "/tokenize", headers={"Authorization": f"Bearer {args.api_key}"},
                     json={"model": args.model, "prompt": text}).json()["tokens"]
    cut = client.completions.create(model=args.model, prompt=text, max_tokens=8, temperature=0,
                                    extra_body={"truncate_prompt_tokens": 3})
    as_ids = client.completions.create(model=args.model, prompt=ids[-3:], max_tokens=8, temperature=0)
    check("truncate_prompt_tokens 3 equals the last 3 token ids", cut.choices[0].text, as_ids.choices[0].text)
    check("truncated prompt_tokens", cut.usage.prompt_tokens, 3)
    whole = client.completions.create(model=args.model, prompt=text, max_tokens=8, temperature=0,
                                      extra_body={"truncate_prompt_tokens": -1})
    check("truncate_prompt_tokens -1 keeps the prompt", whole.usage.prompt_tokens, len(ids))
    # A cut after an image drops the whole image (slots and pixels): the question alone.
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(args.image[0])}},
                                             {"type": "text", "text": question}]}]
    chat_ids = httpx.post(args.base_url.removesuffix("/v1") + "/tokenize", headers={"Authorization": f"Bearer {args.api_key}"},
                          json={"model": args.model, "messages": messages}).json()["tokens"]
    text_ids = httpx.post(args.base_url.removesuffix("/v1") + "/tokenize", headers={"Authorization": f"Bearer {args.api_key}"},
                          json={"model": args.model, "prompt": question, "add_special_tokens": False}).json()["tokens"]
    k = len(text_ids)
    no_image = client.chat.completions.create(model=args.model, messages=messages, max_tokens=8, temperature=0,
                                              extra_body={"truncate_prompt_tokens": k})
    question_ids = client.completions.create(model=args.model, prompt=chat_ids[-k:], max_tokens=8, temperature=0)
    check("truncation past an image equals the question's ids", no_image.choices[0].message.content,
          question_ids.choices[0].text)
    check("the question's ids are the chat prompt's last ones", chat_ids[-k:], text_ids)
    check("truncated chat prompt_tokens", no_image.usage.prompt_tokens, k)

    # logit_bias, min_p, min_tokens, stop_token_ids (OpenAI's and vLLM's) as `kosmos-rt run`
    # applies them, with token ids from the server's own /tokenize.
    def token(word):
        r = httpx.post(args.base_url.removesuffix("/v1") + "/tokenize", headers={"Authorization": f"Bearer {args.api_key}"},
                       json={"model": args.model, "prompt": word, "add_special_tokens": False}).json()
        return r["tokens"][0]
    red, on = token(" red"), token(" on")
    cases = [
        ("logit_bias +100", dict(logit_bias={str(red): 100}), ["--logit-bias", f"{red}=100"]),
        ("logit_bias -100 and +99", dict(logit_bias={str(red): -100, str(on): 99}),
         ["--logit-bias", f"{red}=-100", "--logit-bias", f"{on}=99"]),
        ("min_p sampled", dict(temperature=1.0, seed=3, extra_body={"min_p": 0.2}),
         ["--temperature", "1.0", "--seed", "3", "--min-p", "0.2"]),
        ("min_tokens", dict(extra_body={"min_tokens": 10}), ["--min-tokens", "10"]),
        ("stop_token_ids", dict(logit_bias={str(on): 5}, extra_body={"stop_token_ids": [on]}),
         ["--logit-bias", f"{on}=5", "--stop-token-id", str(on)]),
        # vLLM's: only three tokens (no </s>: all 12 come), and words never generated. The values
        # that ask for nothing (skip_special_tokens true, priority 0, ...) are accepted.
        ("allowed_token_ids", dict(extra_body={"allowed_token_ids": [red, on, 9]}),
         ["--allowed-token-id", str(red), "--allowed-token-id", str(on), "--allowed-token-id", "9"]),
        ("bad_words over a +100 bias", dict(logit_bias={str(red): 100}, extra_body={"bad_words": ["red", "on the"], "skip_special_tokens": True, "priority": 0}),
         ["--logit-bias", f"{red}=100", "--bad-word", "red", "--bad-word", "on the"]),
        ("bad_words sampled", dict(temperature=1.0, seed=4, extra_body={"bad_words": ["red"]}),
         ["--temperature", "1.0", "--seed", "4", "--bad-word", "red"]),
    ]
    for what, kw, flags in cases:
        kw = {"temperature": 0, **kw}
        r = client.completions.create(model=args.model, prompt=text, max_tokens=12, **kw)
        want = run_reference(args.binary, args.package, prompt=text, max_tokens=12, extra=flags)
        check(f"completion with {what}", r.choices[0].text.strip(), want)
        if what == "logit_bias +100" and not r.choices[0].text.strip().startswith("red"):
            failures.append("logit_bias +100 did not make 'red' first")
        if what.startswith("logit_bias -100") and not r.choices[0].text.strip().startswith("on"):
            failures.append("logit_bias +99 did not make 'on' first")
        if what == "min_tokens" and r.usage.completion_tokens < 10:
            failures.append(f"min_tokens 10 gave {r.usage.completion_tokens} tokens")
        if what == "allowed_token_ids" and r.usage.completion_tokens != 12:
            failures.append(f"allowed_token_ids without </s> stopped after {r.usage.completion_tokens} tokens")
        if what.startswith("bad_words") and "red" in r.choices[0].text.split():
            failures.append(f"bad_words let 'red' through: {r.choices[0].text!r}")
    for bad, param in [({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"99999999": 1}}, "logit_bias"),
                       ({"logit_bias": {"5": 101}}, "logit_bias"), ({"min_p": 1.5}, "min_p"),
                       ({"min_tokens": 20}, "min_tokens"), ({"stop_token_ids": [-1]}, "stop_token_ids")]:
        try:
            client.completions.create(model=args.model, prompt=text, max_tokens=12, extra_body=bad)
            failures.append(f"{bad} accepted")
        except openai.BadRequestError as e:
            got = e.body.get("param") if isinstance(e.body, dict) else None
            check(f"400 for {bad}", got, param)

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        failures.append("unknown model accepted")
    except openai.NotFoundError as e:
        print(f"ok       unknown model -> 404 {e.body.get('message') if isinstance(e.body, dict) else e.body}")

    if failures:
        print("FAILED:", ", ".join(failures))
        sys.exit(1)
    print("all openai client checks passed")


if __name__ == "__main__":
    main()
