"""`Model`: one package, one generation at a time (`kosmos_generate`)."""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from ctypes import POINTER, byref, c_float, c_size_t, c_uint32, c_void_p
from dataclasses import dataclass

from . import _lib
from ._lib import lib
from ._params import Call, prompt_bytes, take_string
from .errors import check
from .handles import Handle, package_path
from .tokenizer import OwnsTokenizer


@dataclass(frozen=True)
class Scored:
    """A prompt scored teacher-forced (`Model.score`)."""

    #: The prompt's token ids: `<s>` first, image slots included, `</s>` last with add_eos.
    tokens: list[int]
    #: Each token's natural-log probability given the tokens before it; None for the first
    #: token and for image slots, which the model does not predict.
    logprobs: list[float | None]

    def total(self, start: int = 0) -> float:
        """The sum of the log-probabilities from token `start` on (None counts as 0): how likely
        the model finds that part given what comes before it."""
        return sum(lp for lp in self.logprobs[start:] if lp is not None)


class Model(OwnsTokenizer, Handle):
    """A loaded package (`kosmos-export` output).

    >>> model = kosmos_rt.Model("pkg/tiny")
    >>> model.generate("Question: what colour is the circle? Answer:", images=["a.png"], max_tokens=8)
    ' red'
    >>> for piece in model.stream("", images=["a.png"]):   # a caption, as it is generated
    ...     print(piece, end="", flush=True)

    Calls from several threads take turns; for requests decoded together use `Engine`.
    """

    def __init__(self, package_dir, device: str = "cpu"):
        out = c_void_p()
        check(lib.kosmos_model_open(package_path(package_dir), device.encode(), byref(out)))
        super().__init__(out.value, lib.kosmos_model_free)
        self.package_dir = str(package_dir)
        self._turn = threading.Lock()

    def close(self) -> None:
        """Release the model (waits for a generation in progress); later calls raise
        InvalidHandleError."""
        with self._turn:
            super().close()
            self._close_tokenizer()

    def chat(
        self,
        messages,
        *,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        **settings,
    ) -> str:
        """`generate` on the prompt a chat makes (as the server's `/v1/chat/completions`):
        OpenAI-style messages whose image parts carry the images (see
        `Tokenizer.apply_chat_template`)."""
        prompt, images = self.tokenizer.chat_prompt(messages, add_generation_prompt, continue_final_message)
        return self.generate(prompt, images, **settings)

    def chat_stream(
        self,
        messages,
        *,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        **settings,
    ) -> Iterator[str]:
        """`chat`, as an iterator over the text pieces."""
        prompt, images = self.tokenizer.chat_prompt(messages, add_generation_prompt, continue_final_message)
        return self.stream(prompt, images, **settings)

    def generate(
        self, prompt: str = "", images=(), *, beams: int | None = None, on_text=None, **settings
    ) -> str:
        """The generated continuation of `prompt`.

        `prompt` places the images in order where it says `<image>`; without markers they come
        first (an image and an empty prompt asks for a caption). `images`: paths, encoded
        PNG/JPEG/WebP bytes or PIL images. `on_text(piece)` (optional) receives the text as it
        is produced; returning False stops generation there.

        Settings (library defaults when left out: 32 tokens, greedy): max_tokens, temperature,
        top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed,
        stop (a string or a list), ignore_eos, min_tokens, logit_bias ({token: bias}),
        stop_token_ids, allowed_token_ids, bad_words, beams, and one constraint: json_schema
        (a dict or its JSON text), json_object=True, regex, grammar (GBNF) or choice (a list
        of strings).
        """
        if beams is not None:
            settings["beams"] = beams
        call = Call(images, settings, extra=("beams",))
        failure = []

        def receive(piece, _user):
            try:
                keep = on_text(piece.decode("utf-8")) if on_text else True
                return keep is not False
            except BaseException as e:  # an exception cannot cross the C callback
                failure.append(e)
                return False

        callback = _lib.token_callback(receive)
        out = c_void_p()
        with self._turn:
            status = lib.kosmos_generate(
                self._live(),
                prompt_bytes(prompt),
                call.images,
                call.n_images,
                byref(call.params),
                callback,
                None,
                byref(out),
            )
            check(status)
        text = take_string(out.value)
        if failure:
            raise failure[0]
        return text

    def stream(self, prompt: str = "", images=(), **settings) -> Iterator[str]:
        """`generate`, as an iterator over the text pieces; leaving the loop early stops the
        generation."""
        pieces = queue.Queue()
        stop = threading.Event()
        done = object()

        def on_text(piece):
            pieces.put(piece)
            return not stop.is_set()

        def run():
            try:
                self.generate(prompt, images, on_text=on_text, **settings)
                pieces.put(done)
            except BaseException as e:
                pieces.put(e)

        worker = threading.Thread(target=run, name="kosmos-stream", daemon=True)
        worker.start()
        try:
            while True:
                item = pieces.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join()

    def score(self, prompt: str = "", images=(), *, add_eos: bool = False) -> Scored:
        """Score `prompt` (with its images, placed as `generate` places them) teacher-forced, in
        one decoder call: each token's log-probability given the tokens before it. With
        `add_eos`, `</s>` ends the prompt and is scored too. Ranking candidate answers by their
        log-likelihood is how the KOSMOS-1 paper classifies images zero-shot (the shared prefix
        scores the same for each, so the whole prompt's total ranks them as their own tokens'):

        >>> best = max(["cat", "dog"], key=lambda c: model.score(
        ...     f"<image> a photo of a {c}", ["pet.jpg"], add_eos=True).total())
        """
        call = Call(images, {})
        tokens = POINTER(c_uint32)()
        logprobs = POINTER(c_float)()
        n = c_size_t()
        with self._turn:
            check(
                lib.kosmos_score(
                    self._live(),
                    prompt_bytes(prompt),
                    call.images,
                    call.n_images,
                    add_eos,
                    byref(tokens),
                    byref(logprobs),
                    byref(n),
                )
            )
        try:
            ids = tokens[: n.value] if n.value else []
            values = [None if math.isnan(v) else v for v in logprobs[: n.value]] if n.value else []
        finally:
            lib.kosmos_tokens_free(tokens, n.value)
            lib.kosmos_logprobs_free(logprobs, n.value)
        return Scored(ids, values)

    def set_speculation(
        self, tokens: int, prompt_lookup_min: int = 1, prompt_lookup_max: int = 3, schedule: str = "auto"
    ) -> None:
        """Speculative decoding by prompt lookup for later `generate` calls (output unchanged):
        up to `tokens` guesses per decoder call (0 turns it off); schedule "auto", "fixed" or
        "adaptive". Needs a package exported with `--kv-cache buffer`."""
        if schedule not in _lib.SPECULATE:
            raise ValueError(f"schedule: {schedule!r} is not one of {', '.join(_lib.SPECULATE)}")
        with self._turn:
            check(
                lib.kosmos_model_set_speculation(
                    self._live(), tokens, prompt_lookup_min, prompt_lookup_max, _lib.SPECULATE[schedule]
                )
            )

    def set_draft(self, package_dir, p_min: float = 0.75, device: str = "cpu") -> None:
        """Let a draft model (a smaller package with the same tokenizer, exported with
        `--kv-cache buffer`) make speculative decoding's guesses instead of prompt lookup while
        speculation is on (`set_speculation`); `None` drops it. It guesses its most likely next
        tokens while it gives them at least `p_min` probability. Output unchanged."""
        path = None if package_dir is None else package_path(package_dir)
        with self._turn:
            check(lib.kosmos_model_set_draft(self._live(), path, device.encode(), p_min))
