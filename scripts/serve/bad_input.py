"""Bad-input battery for `kosmos-rt serve`: each case must get a 4xx JSON error in OpenAI's shape
({"error": {"message", "type", "param", "code"}}) naming what is wrong, and the server must keep
answering a good request after every one of them.

The server must run with --api-key (given here) and --allow-file-root ROOT (ROOT given here, with
an image `ok.png` inside and a file `secret.png` beside it).

    python scripts/serve/bad_input.py --base-url http://127.0.0.1:8000 --api-key KEY \
        --model tiny --image a.png --file-root /tmp/root
"""

import argparse
import base64
import io
import os
import sys
import zlib
import struct

import httpx2 as httpx  # the HTTP client the openai package ships with

from common import data_url


def png_header(width, height):
    """A PNG whose header claims width x height (a decompression bomb needs no more than this)."""

    def chunk(kind, data):
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def b64url(data, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--file-root", required=True)
    ap.add_argument("--context", type=int, required=True)
    args = ap.parse_args()
    auth = {"Authorization": f"Bearer {args.api_key}"}
    client = httpx.Client(base_url=args.base_url, timeout=60)
    png = open(args.image, "rb").read()

    def chat(content, **extra):
        return {"model": args.model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}

    def image(url):
        return [{"type": "image_url", "image_url": {"url": url}}]

    good = chat(image(data_url(args.image)), temperature=0)
    root = os.path.realpath(args.file_root)
    cases = [
        # (name, method, path, body (dict | bytes), headers, expected status, words the message must
        # contain[, the error's param])
        ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": "x", "messages": [', auth, 400, "malformed JSON"),
        ("body not an object", "POST", "/v1/chat/completions", b"[1, 2]", auth, 400, "the body must be a JSON object", "body"),
        ("messages wrong type", "POST", "/v1/chat/completions", {"model": args.model, "messages": "hi"}, auth, 400, "messages: invalid type: string \"hi\", expected an array", "messages"),
        ("max_tokens wrong type", "POST", "/v1/chat/completions", chat("hi", max_tokens="ten"), auth, 400, "max_tokens: invalid type: string \"ten\", expected an integer", "max_tokens"),
        ("temperature wrong type", "POST", "/v1/completions", {"prompt": "a", "temperature": "hot"}, auth, 400, "expected a number", "temperature"),
        ("stop wrong type", "POST", "/v1/completions", {"prompt": "a", "stop": 5}, auth, 400, "stop: expected a string or an array of strings", "stop"),
        ("logit_bias value wrong type", "POST", "/v1/completions", {"prompt": "a", "logit_bias": {"5": "up"}}, auth, 400, "expected a number", "logit_bias.5"),
        ("stream wrong type", "POST", "/v1/chat/completions", chat("hi", stream="yes"), auth, 400, "expected a boolean", "stream"),
        ("content wrong type", "POST", "/v1/chat/completions", chat(5), auth, 400, "expected a string or an array of content parts", "messages[0].content"),
        ("message without role", "POST", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, auth, 400, "missing field `messages[0].role`", "messages[0].role"),
        ("missing messages", "POST", "/v1/chat/completions", {"model": args.model}, auth, 400, "missing field `messages`", "messages"),
        ("empty messages", "POST", "/v1/chat/completions", {"model": args.model, "messages": []}, auth, 400, "messages must not be empty"),
        ("unknown role", "POST", "/v1/chat/completions", {"model": args.model, "messages": [{"role": "robot", "content": "hi"}]}, auth, 400, "role"),
        ("unknown part type", "POST", "/v1/chat/completions", chat([{"type": "audio", "audio": {}}]), auth, 400, "part 0: unknown variant `audio`", "messages[0].content"),
        ("unknown model", "POST", "/v1/chat/completions", {**good, "model": "gpt-4"}, auth, 404, "does not exist"),
        ("invalid base64", "POST", "/v1/chat/completions", chat(image("data:image/png;base64,!!!not-base64!!!")), auth, 400, "invalid base64"),
        ("data URL without base64", "POST", "/v1/chat/completions", chat(image("data:image/png,rawbytes")), auth, 400, "base64"),
        ("non-image bytes", "POST", "/v1/chat/completions", chat(image(b64url(b"this is plain text, not a picture"))), auth, 400, "image 1"),
        ("truncated PNG", "POST", "/v1/chat/completions", chat(image(b64url(png[: len(png) // 2]))), auth, 400, "image 1"),
        ("huge image (header)", "POST", "/v1/chat/completions", chat(image(b64url(png_header(100000, 100000)))), auth, 400, "exceeds the limit"),
        ("too many images", "POST", "/v1/chat/completions", chat(image(data_url(args.image)) * 9), auth, 400, "images in the request"),
        ("prompt over context", "POST", "/v1/completions", {"model": args.model, "prompt": "red " * (2 * args.context), "max_tokens": 4}, auth, 400, "context"),
        ("max_tokens over context", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "max_tokens": 10 * args.context}, auth, 400, "maximum context length"),
        ("negative max_tokens", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "max_tokens": -5}, auth, 400, "max_tokens"),
        ("huge max_tokens", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "max_tokens": 2**62}, auth, 400, "context"),
        ("temperature out of range", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "temperature": 7}, auth, 400, "temperature"),
        ("negative temperature", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "temperature": -0.5}, auth, 400, "temperature must be ≥ 0"),
        ("top_p zero", "POST", "/v1/chat/completions", chat("hi", top_p=0), auth, 400, "top_p must be in (0, 1]"),
        ("repetition_penalty zero", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "repetition_penalty": 0}, auth, 400, "repetition_penalty must be positive"),
        ("n too large", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "n": 1000}, auth, 400, "n must be"),
        ("presence_penalty out of range", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "presence_penalty": 2.5}, auth, 400, "presence_penalty must be in [-2, 2]"),
        ("top_logprobs over 20", "POST", "/v1/chat/completions", chat("hi", logprobs=True, top_logprobs=21), auth, 400, "top_logprobs must be in 0..=20"),
        ("top_logprobs without logprobs", "POST", "/v1/chat/completions", chat("hi", top_logprobs=2), auth, 400, "needs logprobs: true"),
        ("chat logprobs not a bool", "POST", "/v1/chat/completions", chat("hi", logprobs=3), auth, 400, "true or false"),
        ("completions logprobs not an integer", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "logprobs": True}, auth, 400, "integer"),
        ("image marker in completions", "POST", "/v1/completions", {"model": args.model, "prompt": "<image> a"}, auth, 400, "image"),
        ("token id over the vocabulary", "POST", "/v1/completions", {"model": args.model, "prompt": [0, 10**9]}, auth, 400, "prompt[1] = 1000000000 is not a token id"),
        ("negative token id", "POST", "/v1/completions", {"model": args.model, "prompt": [[0, 5], [0, -1]]}, auth, 400, "prompt[1][1] = -1 is not a token id"),
        ("empty prompt array", "POST", "/v1/completions", {"model": args.model, "prompt": []}, auth, 400, "empty array"),
        ("empty token list", "POST", "/v1/completions", {"model": args.model, "prompt": [[0, 5], []]}, auth, 400, "prompt[1] has no tokens"),
        ("mixed prompt array", "POST", "/v1/completions", {"model": args.model, "prompt": [0, "a"]}, auth, 400, "array of token ids"),
        ("scored prompt over context", "POST", "/v1/completions", {"model": args.model, "prompt": [0] * (args.context + 1), "max_tokens": 0, "echo": True}, auth, 400, "maximum context length"),
        ("max_tokens 0 without echo", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "max_tokens": 0}, auth, 400, "only with echo"),
        ("chat max_tokens 0", "POST", "/v1/chat/completions", chat("hi", max_tokens=0), auth, 400, "at least 1"),
        ("audio output", "POST", "/v1/chat/completions", chat("hi", modalities=["text", "audio"]), auth, 400, "modalities is not supported"),
        ("web search", "POST", "/v1/chat/completions", chat("hi", web_search_options={}), auth, 400, "no outbound requests"),
        ("vLLM beam search", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "use_beam_search": True}, auth, 400, "use_beam_search"),
        ("stop string in output", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "include_stop_str_in_output": True}, auth, 400, "include_stop_str_in_output"),
        # vLLM's and llama.cpp's fields that would change the answer: refused, never ignored.
        ("prompt_logprobs over 20", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "prompt_logprobs": 21}, auth, 400, "prompt_logprobs must be in 0..=20", "prompt_logprobs"),
        ("prompt_logprobs in responses", "POST", "/v1/responses", {"input": "a", "prompt_logprobs": 1}, auth, 400, "not a Responses API field", "prompt_logprobs"),
        ("vLLM truncate_prompt_tokens 0", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "truncate_prompt_tokens": 0}, auth, 400, "truncate_prompt_tokens must be"),
        ("vLLM truncate_prompt_tokens with echo", "POST", "/v1/completions", {"model": args.model, "prompt": "a b c", "echo": True, "truncate_prompt_tokens": 2}, auth, 400, "cannot be combined with echo"),
        ("vLLM truncation through an image", "POST", "/v1/chat/completions", {**good, "truncate_prompt_tokens": 12}, auth, 400, "would cut image 1"),
        ("vLLM skip_special_tokens false", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "skip_special_tokens": False}, auth, 400, "skip_special_tokens is not supported"),
        ("vLLM length_penalty", "POST", "/v1/chat/completions", chat("hi", length_penalty=2.0), auth, 400, "length_penalty is not supported"),
        ("vLLM chat_template", "POST", "/v1/chat/completions", chat("hi", chat_template="{{ 1 }}"), auth, 400, "chat_template is not supported"),
        ("vLLM continue_final_message after a user message", "POST", "/v1/chat/completions", chat("hi", continue_final_message=True), auth, 400, "must be the assistant's"),
        ("vLLM continue_final_message with add_generation_prompt", "POST", "/v1/chat/completions", {**chat("hi"), "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}], "continue_final_message": True, "add_generation_prompt": True}, auth, 400, "cannot both be true"),
        ("vLLM chat echo", "POST", "/v1/chat/completions", chat("hi", echo=True), auth, 400, "echo is not supported"),
        ("vLLM empty allowed_token_ids", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "allowed_token_ids": []}, auth, 400, "must not be empty"),
        ("vLLM allowed token out of vocabulary", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "allowed_token_ids": [5, 10**6]}, auth, 400, "not below the vocabulary size"),
        ("vLLM empty bad word", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "bad_words": ["red", " "]}, auth, 400, "must not be empty"),
        ("llama.cpp mirostat", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "mirostat": 2}, auth, 400, "mirostat is not supported"),
        ("llama.cpp typical_p", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "typical_p": 0.5}, auth, 400, "typical_p is not supported"),
        ("llama.cpp repeat_penalty", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "repeat_penalty": 1.3}, auth, 400, "use repetition_penalty"),
        ("llama.cpp n_probs", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "n_probs": 3}, auth, 400, "n_probs is not supported"),
        ("a bool given as text", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "skip_special_tokens": "no"}, auth, 400, "skip_special_tokens is not supported"),
        ("tools on completions", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "tools": []}, auth, 400, "chat completions field"),
        ("logit_bias not an object", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "logit_bias": [1]}, auth, 400, "invalid"),
        ("17 stop strings", "POST", "/v1/completions", {"model": args.model, "prompt": "a", "stop": [f"s{i}" for i in range(17)]}, auth, 400, "stop takes up to 16"),
        ("tokenize without a prompt", "POST", "/tokenize", {"model": args.model}, auth, 400, "either prompt"),
        ("tokenize unknown model", "POST", "/tokenize", {"model": "gpt-4", "prompt": "a"}, auth, 404, "does not exist"),
        ("detokenize a bad id", "POST", "/detokenize", {"tokens": [0, 10**9]}, auth, 400, "tokens[1] = 1000000000 is not a token id"),
        ("tokenizer_info needs the key", "GET", "/tokenizer_info", None, {}, 401, "API key"),
        ("missing API key", "POST", "/v1/chat/completions", good, {}, 401, "API key"),
        ("wrong API key", "POST", "/v1/chat/completions", good, {"Authorization": "Bearer wrong"}, 401, "Incorrect API key"),
        ("wrong API key on models", "GET", "/v1/models", None, {"Authorization": "Bearer wrong"}, 401, "API key"),
        ("metrics need the key", "GET", "/metrics", None, {}, 401, "API key"),
        ("http image URL", "POST", "/v1/chat/completions", chat(image("http://169.254.169.254/latest/meta-data")), auth, 400, "--allow-remote-images"),
        ("ftp image URL", "POST", "/v1/chat/completions", chat(image("ftp://example.com/a.png")), auth, 400, "not supported"),
        ("file URL with ..", "POST", "/v1/chat/completions", chat(image(f"file://{root}/../secret.png")), auth, 403, ".."),
        ("file URL outside root", "POST", "/v1/chat/completions", chat(image("file:///etc/passwd")), auth, 403, "outside the allowed file root"),
        ("file URL symlink escape", "POST", "/v1/chat/completions", chat(image(f"file://{root}/escape.png")), auth, 403, "outside the allowed file root"),
        ("unknown route", "GET", "/v1/nothing", None, auth, 404, "no route"),
        ("wrong method", "GET", "/v1/chat/completions", None, auth, 405, "not allowed"),
        ("body too large", "POST", "/v1/chat/completions", b'{"model": "' + b"x" * (40 << 20) + b'"}', auth, 413, "too large"),
    ]
    failures = []
    for name, method, path, body, headers, status, words, *param in cases:
        kw = {"headers": headers}
        if isinstance(body, bytes):
            kw["content"] = body
            kw["headers"] = {**headers, "Content-Type": "application/json"}
        elif body is not None:
            kw["json"] = body
        r = client.request(method, path, **kw)
        problems = []
        if r.status_code != status:
            problems.append(f"status {r.status_code}, wanted {status}")
        try:
            err = r.json()["error"]
            for key in ("message", "type", "param", "code"):
                if key not in err:
                    problems.append(f"error object lacks '{key}'")
            if words.lower() not in err["message"].lower():
                problems.append(f"message {err['message']!r} does not mention {words!r}")
            if param and err["param"] != param[0]:
                problems.append(f"param {err['param']!r}, wanted {param[0]!r}")
        except Exception as e:  # noqa: BLE001 - any non-JSON answer is a failure to report
            problems.append(f"not an OpenAI error body ({e}): {r.text[:200]!r}")
        # After each bad request the server must still answer a good one.
        ok = client.post("/v1/chat/completions", json=good, headers=auth)
        if ok.status_code != 200 or not ok.json()["choices"][0]["message"]["content"]:
            problems.append(f"server did not answer a good request afterwards ({ok.status_code})")
        print(f"{'ok' if not problems else 'FAIL':5} {name}: {r.status_code} {r.text[:120]}")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}")

    # Allowed: a file under the root, and /health without the key.
    r = client.post("/v1/chat/completions", json=chat(image(f"file://{root}/ok.png"), temperature=0), headers=auth)
    print(f"{'ok' if r.status_code == 200 else 'FAIL':5} file URL under the root: {r.status_code}")
    if r.status_code != 200:
        failures.append(f"file under the root refused: {r.text}")
    # As in vLLM, `model` may be left out: the server serves one.
    r = client.post("/v1/chat/completions", json={k: v for k, v in good.items() if k != "model"}, headers=auth)
    print(f"{'ok' if r.status_code == 200 else 'FAIL':5} request without model: {r.status_code}")
    if r.status_code != 200:
        failures.append(f"request without model refused: {r.text}")
    r = client.get("/health")
    if r.status_code != 200:
        failures.append(f"/health without a key: {r.status_code}")

    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print(f"all {len(cases)} bad inputs answered with 4xx OpenAI errors; the server kept serving")


if __name__ == "__main__":
    main()
