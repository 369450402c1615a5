"""Keyword arguments → `struct kosmos_params` and `struct kosmos_image` arrays.

The library validates every value (and names the field it refuses); this module only converts
Python values and keeps the buffers the struct points into alive for the call.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
from ctypes import POINTER, byref, c_char_p, c_float, c_uint8, c_uint32, cast, sizeof

from . import _lib
from ._lib import kosmos_image, kosmos_params, lib
from .errors import check

#: Settings every generation takes (see `help(kosmos_rt.Model.generate)`).
SAMPLING = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "ignore_eos",
    "min_tokens",
    "logit_bias",
    "stop_token_ids",
    "allowed_token_ids",
    "bad_words",
    "json_schema",
    "json_object",
    "regex",
    "grammar",
    "choice",
)


class Call:
    """One call's `kosmos_params` and image array, with the memory they point into."""

    def __init__(self, images, settings: dict, extra: tuple = ()):
        unknown = sorted(set(settings) - set(SAMPLING) - set(extra))
        if unknown:
            raise TypeError(f"unknown generation setting(s): {', '.join(unknown)}")
        self._keep = []
        self.params = kosmos_params()
        check(lib.kosmos_params_init(byref(self.params), sizeof(kosmos_params)))
        self._fill(settings)
        self.images, self.n_images = self._images(images)

    def _fill(self, s: dict) -> None:
        p = self.params
        for name in (
            "max_tokens",
            "top_k",
            "min_tokens",
            "beams",
        ):
            if s.get(name) is not None:
                setattr(p, name, _unsigned(name, s[name], 32))
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            if s.get(name) is not None:
                setattr(p, name, float(s[name]))
        if s.get("seed") is not None:
            p.seed = _unsigned("seed", s["seed"], 64)
        if s.get("ignore_eos") is not None:
            p.ignore_eos = bool(s["ignore_eos"])
        if s.get("logprobs") is not None:
            p.logprobs = int(s["logprobs"])
        if s.get("priority") is not None:
            p.priority = int(s["priority"])
        stop = s.get("stop")
        if stop is not None:
            p.stop, p.n_stop = self._strings([stop] if isinstance(stop, str) else stop)
        if s.get("bad_words") is not None:
            p.bad_words, p.n_bad_words = self._strings(s["bad_words"])
        if s.get("stop_token_ids") is not None:
            p.stop_token_ids, p.n_stop_token_ids = self._ids("stop_token_ids", s["stop_token_ids"])
        if s.get("allowed_token_ids") is not None:
            p.allowed_token_ids, p.n_allowed_token_ids = self._ids(
                "allowed_token_ids", s["allowed_token_ids"]
            )
        bias = s.get("logit_bias")
        if bias:
            tokens, n = self._ids("logit_bias", list(bias.keys()))
            values = (c_float * n)(*(float(v) for v in bias.values()))
            self._keep.append(values)
            p.logit_bias_tokens, p.logit_bias_values, p.n_logit_bias = tokens, values, n
        self._constraint(s)

    def _constraint(self, s: dict) -> None:
        given = [
            k
            for k in ("json_schema", "json_object", "regex", "grammar", "choice")
            if s.get(k) not in (None, False)
        ]
        if len(given) > 1:
            raise ValueError(f"one constraint per generation; got {', '.join(given)}")
        if not given:
            return
        kind, value = given[0], s[given[0]]
        p = self.params
        if kind == "json_object":
            p.constraint_kind = _lib.CONSTRAINT_JSON_OBJECT
            return
        if kind == "json_schema":
            p.constraint_kind = _lib.CONSTRAINT_JSON_SCHEMA
            text = value if isinstance(value, str) else json.dumps(value)
        elif kind == "regex":
            p.constraint_kind = _lib.CONSTRAINT_REGEX
            text = value
        elif kind == "grammar":
            p.constraint_kind = _lib.CONSTRAINT_GRAMMAR
            text = value
        else:
            if isinstance(value, str) or not value:
                raise ValueError("choice: give a non-empty list of strings")
            p.constraint_kind = _lib.CONSTRAINT_GRAMMAR
            text = "root ::= " + " | ".join(_gbnf_literal(str(c)) for c in value) + "\n"
        p.constraint = self._c_string(text)

    def _c_string(self, text: str) -> bytes:
        b = _utf8(text)
        self._keep.append(b)
        return b

    def _strings(self, items):
        items = [self._c_string(x) for x in items]
        arr = (c_char_p * max(len(items), 1))(*items)
        self._keep.append(arr)
        return cast(arr, POINTER(c_char_p)), len(items)

    def _ids(self, what: str, ids):
        ids = [_unsigned(what, i, 32) for i in ids]
        arr = (c_uint32 * max(len(ids), 1))(*ids)
        self._keep.append(arr)
        return cast(arr, POINTER(c_uint32)), len(ids)

    def _images(self, images):
        if images is None:
            return None, 0
        if isinstance(images, (str, bytes, os.PathLike)) or hasattr(images, "save"):
            images = [images]
        images = list(images)
        arr = (kosmos_image * max(len(images), 1))()
        for i, img in enumerate(images):
            if isinstance(img, (str, os.PathLike)):
                arr[i].path = self._c_string(os.fspath(img))
            else:
                data = _encoded(img, i)
                buf = (c_uint8 * len(data)).from_buffer_copy(data)
                self._keep.append(buf)
                arr[i].data = cast(buf, POINTER(c_uint8))
                arr[i].size = len(data)
        self._keep.append(arr)
        return (arr if images else None), len(images)


def prompt_bytes(prompt: str) -> bytes:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
    return _utf8(prompt)


def _utf8(text: str) -> bytes:
    b = text.encode("utf-8")
    if b"\0" in b:
        raise ValueError(f"text contains a NUL character: {text[:40]!r}")
    return b


def _unsigned(name: str, value, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name}: {value} is out of range (0 to {(1 << bits) - 1})")
    return value


def _encoded(img, index: int) -> bytes:
    """Encoded image bytes (PNG, JPEG or WebP) from bytes or a PIL image (saved as PNG:
    lossless, so the pixels the model sees are the image's)."""
    if isinstance(img, (bytes, bytearray, memoryview)):
        return bytes(img)
    if hasattr(img, "save"):
        out = io.BytesIO()
        img.save(out, format="PNG")
        return out.getvalue()
    raise TypeError(
        f"images[{index}]: expected a path, encoded image bytes or a PIL image, got {type(img).__name__}"
    )


def _gbnf_literal(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def take_string(ptr) -> str:
    """The text of a string the library returned, released afterwards."""
    if not ptr:
        return ""
    try:
        return ctypes.string_at(ptr).decode("utf-8")
    finally:
        lib.kosmos_string_free(ptr)
