"""`Tokenizer`: a package's token ids and their text (`kosmos_tokenize` / `kosmos_detokenize`)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from ctypes import POINTER, byref, c_size_t, c_uint32, c_void_p

from ._chat import split_images
from ._lib import lib
from ._params import _unsigned, _utf8, take_string
from .errors import check
from .handles import Handle, package_path

# Opening a tokenizer is rare (once per model or engine): one lock for all of them.
_OPENING = threading.Lock()


class Tokenizer(Handle):
    """The tokenizer of a package; any number of threads may use one at once.

    >>> tok = kosmos_rt.Tokenizer("pkg/tiny")
    >>> tok.decode(tok.encode("a red circle", add_bos=False))
    'a red circle'
    """

    def __init__(self, package_dir):
        out = c_void_p()
        check(lib.kosmos_tokenizer_open(package_path(package_dir), byref(out)))
        super().__init__(out.value, lib.kosmos_tokenizer_free)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """The ids of `text` (`<image>` is plain text here), `<s>` first when `add_bos` (every
        prompt starts with it)."""
        ids = POINTER(c_uint32)()
        n = c_size_t()
        check(lib.kosmos_tokenize(self._live(), _utf8(text), add_bos, byref(ids), byref(n)))
        try:
            return ids[: n.value] if n.value else []
        finally:
            lib.kosmos_tokens_free(ids, n.value)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens skipped (as a completion's text is made)."""
        ids = [_unsigned("ids", i, 32) for i in ids]
        arr = (c_uint32 * max(len(ids), 1))(*ids)
        out = c_void_p()
        check(lib.kosmos_detokenize(self._live(), arr, len(ids), byref(out)))
        return take_string(out.value)

    def apply_chat_template(
        self, messages, add_generation_prompt: bool | None = None, continue_final_message: bool = False
    ) -> str:
        """The prompt the server builds for these chat messages (the package's chat template,
        else the parts in order), an `<image>` marker for each image part."""
        return self.chat_prompt(messages, add_generation_prompt, continue_final_message)[0]

    def chat_prompt(
        self, messages, add_generation_prompt: bool | None = None, continue_final_message: bool = False
    ) -> tuple[str, list]:
        """(`apply_chat_template`'s prompt, the messages' images in order, ready for
        `Model.generate` / `Engine.submit`)."""
        text, images = split_images(messages)
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        out = c_void_p()
        n = c_size_t()
        check(
            lib.kosmos_chat_prompt(
                self._live(), _utf8(text), add_generation_prompt, continue_final_message, byref(out), byref(n)
            )
        )
        prompt = take_string(out.value)
        if n.value != len(images):  # the library and split_images disagree: a bug, not bad input
            raise AssertionError(f"{n.value} image places in the prompt for {len(images)} images")
        return prompt, images


class OwnsTokenizer:
    """For `Model` and `Engine`: their package's `Tokenizer`, opened on first use (chats need
    it) and closed with them. Needs `package_dir` and `_live()`."""

    _tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The package's tokenizer (opened on first use)."""
        self._live()
        with _OPENING:
            if self._tokenizer is None:
                self._tokenizer = Tokenizer(self.package_dir)
        return self._tokenizer

    def _close_tokenizer(self) -> None:
        if self._tokenizer is not None:
            self._tokenizer.close()
