"""The Python bindings against the Rust API's answers for the same package.

Run by tests/python_api.rs, which exports a tiny package, writes what the Rust API generates
for each case to $KOSMOS_PY_EXPECTED and sets $KOSMOS_RT_LIB to the debug library.
"""

import asyncio
import base64
import ctypes
import json
import os
import re
import subprocess
import tempfile
import threading
import unittest
from pathlib import Path

import kosmos_rt
from kosmos_rt import _lib

EXPECTED = json.loads(Path(os.environ["KOSMOS_PY_EXPECTED"]).read_text())
PACKAGE = EXPECTED["package"]
IMAGE = EXPECTED["image"]
HEADER = Path(__file__).resolve().parents[2] / "runtime/include/kosmos_rt.h"


def case_args(case):
    settings = {
        k: v
        for k, v in case.items()
        if k not in ("prompt", "text", "tokens", "finish_reason", "prompt_tokens")
    }
    images = [IMAGE] if "<image>" in case["prompt"] else []
    return case["prompt"], images, settings


def in_threads(generate):
    """`generate(prompt, images, **settings)` for every case at once, one thread each; the
    results in case order."""
    cases = EXPECTED["cases"]
    got = [None] * len(cases)

    def run(i):
        prompt, images, settings = case_args(cases[i])
        got[i] = generate(prompt, images, **settings)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


class Layout(unittest.TestCase):
    def header_fields(self, struct):
        body = re.search(rf"typedef struct {struct} \{{(.*?)\}} {struct};", HEADER.read_text(), re.S)
        self.assertIsNotNone(body, struct)
        text = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
        return [
            re.search(r"(\w+)\s*;", decl.strip() + ";").group(1) for decl in text.split(";") if decl.strip()
        ]

    def test_structs_mirror_the_header_field_by_field(self):
        for name, cls in _lib.STRUCTS.items():
            self.assertEqual([f for f, _ in cls._fields_], self.header_fields(name), name)

    def test_struct_sizes_and_offsets_equal_the_c_compilers(self):
        lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "kosmos_rt.h"', "int main(void) {"]
        for name, cls in _lib.STRUCTS.items():
            lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
            for field, _ in cls._fields_:
                lines.append(
                    f'printf("{name}.{field} %zu %zu\\n", offsetof(struct {name}, {field}), '
                    f"sizeof(((struct {name} *)0)->{field}));"
                )
        lines.append("return 0; }")
        with tempfile.TemporaryDirectory() as d:
            src, exe = Path(d, "layout.c"), Path(d, "layout")
            src.write_text("\n".join(lines))
            subprocess.run(["cc", "-I", str(HEADER.parent), str(src), "-o", str(exe)], check=True)
            c = dict(line.split(" ", 1) for line in subprocess.check_output([exe], text=True).splitlines())
        import ctypes

        for name, cls in _lib.STRUCTS.items():
            self.assertEqual(int(c[name]), ctypes.sizeof(cls), f"sizeof {name}")
            for field, _ in cls._fields_:
                f = getattr(cls, field)
                self.assertEqual(c[f"{name}.{field}"], f"{f.offset} {f.size}", f"{name}.{field}: offset size")


class Tokenizing(unittest.TestCase):
    def test_ids_equal_hugging_face_tokenizers_on_the_packages_tokenizer_json(self):
        from tokenizers import Tokenizer as HfTokenizer

        hf = HfTokenizer.from_file(str(Path(PACKAGE, "tokenizer.json")))
        with kosmos_rt.Tokenizer(PACKAGE) as tok:
            for text in EXPECTED["texts"]:
                want = hf.encode(text, add_special_tokens=False).ids
                self.assertEqual(tok.encode(text, add_bos=False), want, text)
                self.assertEqual(tok.encode(text), [EXPECTED["bos"]] + want, text)
                self.assertEqual(tok.decode(want), hf.decode(want), text)
            with self.assertRaisesRegex(kosmos_rt.InvalidArgumentError, "999999"):
                tok.decode([999999])


class Generating(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = kosmos_rt.Model(PACKAGE)

    @classmethod
    def tearDownClass(cls):
        cls.model.close()

    def test_each_case_equals_the_rust_api(self):
        for case in EXPECTED["cases"]:
            prompt, images, settings = case_args(case)
            self.assertEqual(self.model.generate(prompt, images, **settings), case["text"], case)

    def test_speculating_by_prompt_lookup_or_a_draft_model_changes_no_answer(self):
        with kosmos_rt.Model(PACKAGE) as model:
            model.set_speculation(4, schedule="fixed")
            for draft in (None, PACKAGE):
                # The package as its own draft: it guesses what the model will say.
                model.set_draft(draft, p_min=0.0)
                for case in EXPECTED["cases"]:
                    prompt, images, settings = case_args(case)
                    self.assertEqual(model.generate(prompt, images, **settings), case["text"], (draft, case))
            with self.assertRaisesRegex(kosmos_rt.InvalidArgumentError, "1.5"):
                model.set_draft(PACKAGE, p_min=1.5)
            with self.assertRaisesRegex(kosmos_rt.PackageError, "nowhere"):
                model.set_draft(Path(PACKAGE) / "nowhere")

    def test_stream_pieces_make_the_text_and_leaving_early_stops(self):
        streams = []
        for case in EXPECTED["cases"]:
            prompt, images, settings = case_args(case)
            pieces = list(self.model.stream(prompt, images, **settings))
            self.assertEqual("".join(pieces), case["text"], case)
            streams.append((len(pieces), case, pieces))
        _, case, pieces = max(streams, key=lambda s: s[0])
        self.assertGreater(len(pieces), 2, "some case streams in several pieces")
        prompt, images, settings = case_args(case)
        first = next(iter(self.model.stream(prompt, images, **settings)))
        self.assertEqual(first, pieces[0])
        # on_text returning False ends generation there, with the text so far.
        got = []
        text = self.model.generate(
            prompt, images, on_text=lambda p: got.append(p) or len(got) < 2, **settings
        )
        self.assertEqual(got, pieces[:2])
        self.assertEqual(text, "".join(pieces[:2]))
        # An exception in on_text stops generation and reaches the caller.
        with self.assertRaisesRegex(ZeroDivisionError, "division"):
            self.model.generate(prompt, images, on_text=lambda p: 1 / 0, **settings)

    def test_score_equals_the_rust_api(self):
        for case in EXPECTED["scores"]:
            images = [IMAGE] if "<image>" in case["prompt"] else []
            got = self.model.score(case["prompt"], images, add_eos=case["add_eos"])
            # JSON holds the shortest decimal of each float32: round it back to float32.
            want = [None if lp is None else ctypes.c_float(lp).value for lp in case["logprobs"]]
            self.assertEqual(got.tokens, case["tokens"], case["prompt"])
            self.assertEqual(got.logprobs, want, case["prompt"])
            self.assertEqual(got.total(), sum(lp for lp in want if lp is not None))
            self.assertEqual(got.total(len(got.tokens) - 1), want[-1])
        with self.assertRaisesRegex(kosmos_rt.ContextLengthError, "context"):
            self.model.score("a red circle " * 400)
        with self.assertRaisesRegex(kosmos_rt.InvalidArgumentError, "image"):
            self.model.score("<image> <image>", [IMAGE])

    def test_images_as_bytes_or_pil_images_equal_paths(self):
        from PIL import Image

        case = next(c for c in EXPECTED["cases"] if "<image>" in c["prompt"])
        prompt, _, settings = case_args(case)
        data = Path(IMAGE).read_bytes()
        self.assertEqual(self.model.generate(prompt, [data], **settings), case["text"])
        self.assertEqual(self.model.generate(prompt, Image.open(IMAGE), **settings), case["text"])

    def test_constraints(self):
        choices = ["red", "green", "blue"]
        out = self.model.generate("Question: what colour is it? Answer:", max_tokens=8, choice=choices)
        self.assertIn(out, choices)
        schema = {
            "type": "object",
            "properties": {
                "colour": {"enum": choices},
                "count": {"type": "integer", "minimum": 1, "maximum": 2},
            },
            "required": ["colour", "count"],
            "additionalProperties": False,
        }
        out = self.model.generate("", max_tokens=40, json_schema=schema)
        import jsonschema

        jsonschema.validate(json.loads(out), schema)
        self.assertRegex(self.model.generate("", max_tokens=8, regex="[0-9]{3}"), r"^[0-9]{3}$")
        # choice is compiled to GBNF: quotes and backslashes in a choice are literal text.
        self.assertIn(
            self.model.generate("", max_tokens=8, choice=['say "hi"', "a\\b"]), ['say "hi"', "a\\b"]
        )
        with self.assertRaisesRegex(ValueError, "one constraint"):
            self.model.generate("", regex="a", choice=["a"])

    def test_bad_input_raises_the_matching_error_naming_the_problem(self):
        with self.assertRaisesRegex(kosmos_rt.PackageError, "no-such-package"):
            kosmos_rt.Model("/no-such-package")
        with self.assertRaisesRegex(kosmos_rt.ImageError, "image"):
            self.model.generate("", [b"not an image"])
        with self.assertRaisesRegex(kosmos_rt.ImageError, "missing.png"):
            self.model.generate("", ["/missing.png"])
        with self.assertRaisesRegex(kosmos_rt.ContextLengthError, "context"):
            self.model.generate("", max_tokens=EXPECTED["max_positions"] + 1)
        with self.assertRaisesRegex(kosmos_rt.InvalidArgumentError, "temperature"):
            self.model.generate("", temperature=-1.0)
        with self.assertRaisesRegex(TypeError, "tempreature"):
            self.model.generate("", tempreature=0.5)
        with self.assertRaisesRegex(ValueError, "NUL"):
            self.model.generate("a\0b")
        with self.assertRaisesRegex(ValueError, "seed"):
            self.model.generate("", seed=-1)
        with self.assertRaisesRegex(kosmos_rt.InvalidArgumentError, "bogus"):
            kosmos_rt.Model(PACKAGE, device="bogus")
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            with self.assertRaisesRegex(kosmos_rt.ProviderError, "(?i)cuda"):
                kosmos_rt.Model(PACKAGE, device="cuda")
        closed = kosmos_rt.Model(PACKAGE)
        closed.close()
        closed.close()  # a second close does nothing
        with self.assertRaisesRegex(kosmos_rt.InvalidHandleError, "closed"):
            closed.generate("")

    def test_threads_take_turns_on_one_model(self):
        got = in_threads(self.model.generate)
        self.assertEqual(got, [c["text"] for c in EXPECTED["cases"]])


def with_chat_template(directory: str, template: str) -> str:
    """A copy of the package whose manifest has this chat template."""
    import shutil

    copy = Path(directory, "pkg")
    shutil.copytree(PACKAGE, copy)
    manifest = json.loads((copy / "kosmos_rt.json").read_text())
    manifest["chat_template"] = template
    (copy / "kosmos_rt.json").write_text(json.dumps(manifest))
    return str(copy)


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}[{{ m.content }}]"
    "{% elif m.role == 'user' %}Q: {{ m.content }}\n{% else %}A: {{ m.content }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
)


class Chatting(unittest.TestCase):
    def messages(self):
        data = base64.b64encode(Path(IMAGE).read_bytes()).decode()
        return [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                    {"type": "text", "text": "What colour is it?"},
                ],
            },
            {"role": "assistant", "content": "red"},
            {
                "role": "user",
                "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "And this?"}],
            },
        ]

    def test_without_a_template_the_parts_go_in_order_as_the_server_puts_them(self):
        case = next(c for c in EXPECTED["cases"] if c["prompt"].startswith("<image> Question"))
        _, _, settings = case_args(case)
        question = case["prompt"][len("<image>") :]
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "path": IMAGE}, {"type": "text", "text": question}],
            }
        ]
        with kosmos_rt.Model(PACKAGE) as model:
            self.assertEqual(model.tokenizer.apply_chat_template(messages), case["prompt"])
            self.assertEqual(model.chat(messages, **settings), case["text"])
            self.assertEqual("".join(model.chat_stream(messages, **settings)), case["text"])
            prompt, images = model.tokenizer.chat_prompt(self.messages())
        self.assertEqual(prompt, "Be brief.\n<image>What colour is it?\nred\n<image>And this?")
        self.assertEqual([type(i) for i in images], [bytes, str])

    def test_the_packages_template_renders_as_jinja2_renders_it(self):
        import jinja2

        with tempfile.TemporaryDirectory() as d:
            package = with_chat_template(d, TEMPLATE)
            template = jinja2.Environment().from_string(TEMPLATE)
            as_text = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "<image>What colour is it?"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "<image>And this?"},
            ]
            special = {"bos_token": EXPECTED["bos_token"], "eos_token": EXPECTED["eos_token"]}
            with kosmos_rt.Tokenizer(package) as tok:
                for add in (True, False):
                    want = template.render(messages=as_text, add_generation_prompt=add, **special)
                    self.assertEqual(
                        tok.apply_chat_template(self.messages(), add_generation_prompt=add), want
                    )
                # Going on from a final assistant message: the template's end of turn is cut.
                going_on = self.messages()[:3]
                want = template.render(messages=as_text[:3], add_generation_prompt=False, **special)
                got = tok.apply_chat_template(going_on, continue_final_message=True)
                self.assertEqual(got, want[: want.rindex("red") + len("red")])
                with self.assertRaisesRegex(kosmos_rt.InvalidArgumentError, "continue_final_message"):
                    tok.apply_chat_template(going_on, add_generation_prompt=True, continue_final_message=True)
                with self.assertRaisesRegex(kosmos_rt.InvalidArgumentError, "role 'robot'"):
                    tok.apply_chat_template([{"role": "robot", "content": "hi"}])
                with self.assertRaisesRegex(
                    kosmos_rt.InvalidArgumentError, r"messages_json at \[0\]\.content"
                ):
                    tok.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}])
                with self.assertRaisesRegex(ValueError, "not fetched"):
                    tok.apply_chat_template(
                        [{"role": "user", "content": [{"type": "image_url", "image_url": "https://x/a.png"}]}]
                    )
            prompt = template.render(messages=as_text, add_generation_prompt=True, **special)
            with kosmos_rt.Model(package) as model:
                want = model.generate(prompt, [IMAGE, IMAGE], max_tokens=6)
                self.assertEqual(model.chat(self.messages(), max_tokens=6), want)
            with kosmos_rt.Engine(package, max_batch=2) as engine:
                self.assertEqual(engine.chat(self.messages(), max_tokens=6).text, want)

    def test_a_template_that_does_not_parse_fails_chats_only(self):
        with tempfile.TemporaryDirectory() as d:
            package = with_chat_template(d, "{% for m in %}")
            with kosmos_rt.Tokenizer(package) as tok:
                self.assertEqual(tok.decode(tok.encode("a red circle", add_bos=False)), "a red circle")
                with self.assertRaisesRegex(kosmos_rt.PackageError, "chat_template does not parse"):
                    tok.apply_chat_template([{"role": "user", "content": "hi"}])


class Batching(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.engine = kosmos_rt.Engine(PACKAGE, max_batch=4, prefill_chunk=16)

    @classmethod
    def tearDownClass(cls):
        cls.engine.close()

    def check(self, case, completion):
        self.assertEqual(completion.text, case["text"], case)
        self.assertEqual(completion.tokens, case["tokens"], case)
        self.assertEqual(completion.finish_reason, case["finish_reason"], case)
        self.assertEqual(completion.generated_tokens, len(case["tokens"]))
        self.assertEqual(completion.prompt_tokens, case["prompt_tokens"], case)

    def test_requests_from_many_threads_each_equal_the_rust_api(self):
        for case, completion in zip(EXPECTED["cases"], in_threads(self.engine.generate)):
            self.check(case, completion)

    def test_a_draft_model_changes_no_answer(self):
        # The package as its own draft, guessing for every request at once.
        with kosmos_rt.Engine(PACKAGE, max_batch=4, draft_package=PACKAGE, draft_p_min=0.0) as engine:
            for case, completion in zip(EXPECTED["cases"], in_threads(engine.generate)):
                self.check(case, completion)

    def test_asyncio_awaits_and_streams(self):
        cases = EXPECTED["cases"]

        async def main():
            requests = [self.engine.submit(*case_args(c)[:2], **case_args(c)[2]) for c in cases]
            done = await asyncio.gather(*requests)
            prompt, images, settings = case_args(cases[0])
            pieces = [p async for p in self.engine.submit(prompt, images, **settings)]
            return done, pieces

        done, pieces = asyncio.run(main())
        for case, completion in zip(cases, done):
            self.check(case, completion)
        self.assertEqual("".join(pieces), cases[0]["text"])

    def test_logprobs_cancel_and_failures(self):
        case = EXPECTED["cases"][0]
        prompt, images, settings = case_args(case)
        request = self.engine.submit(prompt, images, logprobs=3, **settings)
        self.assertEqual("".join(request), case["text"])
        completion = request.result()
        self.check(case, completion)
        self.assertEqual([lp.token for lp in completion.logprobs], case["tokens"])
        for lp in completion.logprobs:
            self.assertEqual(len(lp.top), 3)
            self.assertLessEqual(lp.logprob, 0.0)
            self.assertEqual([t for t in lp.top], sorted(lp.top, key=lambda t: (-t[1], t[0])))
            if settings.get("temperature", 0) == 0:  # greedy: the token is the most likely one
                self.assertEqual(lp.top[0][0], lp.token)
        self.assertIsNone(self.engine.generate(prompt, images, **settings).logprobs)

        long = self.engine.submit("", max_tokens=200, ignore_eos=True)
        long.cancel()
        self.assertEqual(long.result(timeout=60).finish_reason, "cancelled")

        with self.assertRaises(kosmos_rt.KosmosError) as failed:
            self.engine.generate("", max_tokens=EXPECTED["max_positions"] + 1)
        self.assertIn("context", str(failed.exception))
        with self.assertRaisesRegex(TypeError, "beams.*Model.generate"):
            self.engine.generate("", beams=2)
        with self.assertRaisesRegex(TypeError, "max_batch"):
            kosmos_rt.Engine(PACKAGE, max_bach=2)

    def test_token_id_settings_reach_the_library(self):
        with kosmos_rt.Tokenizer(PACKAGE) as tok:
            a, b = tok.encode("red", add_bos=False)[0], tok.encode("blue", add_bos=False)[0]
        forced = self.engine.generate("", max_tokens=4, logit_bias={a: 100.0})
        self.assertEqual(forced.tokens, [a] * 4)
        allowed = self.engine.generate("", max_tokens=6, temperature=1.0, seed=3, allowed_token_ids=[a, b])
        self.assertTrue(set(allowed.tokens) <= {a, b}, allowed)
        stopped = self.engine.generate("", max_tokens=6, logit_bias={a: 100.0}, stop_token_ids=[a])
        self.assertEqual((stopped.finish_reason, stopped.text), ("stop", ""))
        at_least = self.engine.generate(
            "", max_tokens=6, logit_bias={a: 100.0}, stop_token_ids=[a], min_tokens=3
        )
        self.assertGreaterEqual(at_least.generated_tokens, 3)
        self.assertNotIn(a, at_least.tokens[:3])

    def test_close_cancels_what_is_running(self):
        engine = kosmos_rt.Engine(PACKAGE, max_batch=2)
        running = [engine.submit("", max_tokens=200, ignore_eos=True) for _ in range(3)]
        engine.close()
        for r in running:
            self.assertEqual(r.result(timeout=0).finish_reason, "cancelled")
        with self.assertRaisesRegex(kosmos_rt.InvalidHandleError, "closed"):
            engine.submit("")

    def test_close_on_the_engines_own_thread_is_handed_to_another(self):
        engine = kosmos_rt.Engine(PACKAGE, max_batch=1)
        self.assertEqual(engine.generate("", max_tokens=2).generated_tokens, 2)
        freed_on, free = [], engine._free

        def recording_free(ptr):
            freed_on.append(threading.get_ident())
            return free(ptr)

        engine._free = recording_free
        engine._engine_thread = threading.get_ident()  # this thread stands in for the engine's
        engine.close()  # as a finalizer running there would
        for _ in range(100):
            if engine.closed and freed_on:
                break
            threading.Event().wait(0.05)
        self.assertTrue(engine.closed)
        self.assertEqual(len(freed_on), 1)
        self.assertNotEqual(freed_on[0], threading.get_ident(), "freed from another thread")


if __name__ == "__main__":
    unittest.main()
