"""Loading libkosmos_rt.so and declaring its C ABI (runtime/include/kosmos_rt.h) for ctypes.

The structs below mirror the header field by field; tests/python_api.rs checks their sizes and
offsets against the C compiler's, so a header change that is not mirrored here fails the tests.
"""

import ctypes
import glob
import importlib.util
import os
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_float,
    c_int,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path

#: The ABI these bindings were written for (`KOSMOS_ABI_VERSION`).
ABI_VERSION = 1

LIBRARY_ENV = "KOSMOS_RT_LIB"


class kosmos_params(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("max_tokens", c_uint32),
        ("temperature", c_float),
        ("top_k", c_uint32),
        ("top_p", c_float),
        ("repetition_penalty", c_float),
        ("presence_penalty", c_float),
        ("frequency_penalty", c_float),
        ("seed", c_uint64),
        ("beams", c_uint32),
        ("stop", POINTER(c_char_p)),
        ("n_stop", c_size_t),
        ("ignore_eos", c_bool),
        ("logprobs", c_int32),
        ("min_p", c_float),
        ("min_tokens", c_uint32),
        ("logit_bias_tokens", POINTER(c_uint32)),
        ("logit_bias_values", POINTER(c_float)),
        ("n_logit_bias", c_size_t),
        ("stop_token_ids", POINTER(c_uint32)),
        ("n_stop_token_ids", c_size_t),
        ("constraint_kind", c_uint32),
        ("constraint", c_char_p),
        ("allowed_token_ids", POINTER(c_uint32)),
        ("n_allowed_token_ids", c_size_t),
        ("bad_words", POINTER(c_char_p)),
        ("n_bad_words", c_size_t),
        ("priority", c_int32),
    ]


class kosmos_image(Structure):
    _fields_ = [
        ("path", c_char_p),
        ("data", POINTER(c_uint8)),
        ("size", c_size_t),
    ]


class kosmos_engine_config(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("max_batch", c_uint32),
        ("prefill_chunk", c_uint32),
        ("vision_cache", c_uint32),
        ("kv_preallocate", c_bool),
        ("prefix_cache_mb", c_uint32),
        ("priority_preemption", c_bool),
        ("speculative_tokens", c_uint32),
        ("prompt_lookup_max", c_uint32),
        ("prompt_lookup_min", c_uint32),
        ("speculative_max_batch", c_uint32),
        ("speculative_schedule", c_uint32),
        ("draft_package", c_char_p),
        ("draft_p_min", c_float),
    ]


class kosmos_top_logprob(Structure):
    _fields_ = [("token", c_uint32), ("logprob", c_float)]


class kosmos_token_logprob(Structure):
    _fields_ = [
        ("token", c_uint32),
        ("logprob", c_float),
        ("top", POINTER(kosmos_top_logprob)),
        ("n_top", c_size_t),
    ]


class kosmos_event(Structure):
    _fields_ = [
        ("request", c_uint64),
        ("kind", c_int),
        ("text", c_char_p),
        ("finish_reason", c_int),
        ("prompt_tokens", c_uint32),
        ("generated_tokens", c_uint32),
        ("tokens", POINTER(c_uint32)),
        ("logprobs", POINTER(kosmos_token_logprob)),
        ("n_logprobs", c_size_t),
    ]


#: Every struct the header declares, by its C name (the layout test walks this).
STRUCTS = {
    cls.__name__: cls
    for cls in (
        kosmos_params,
        kosmos_image,
        kosmos_engine_config,
        kosmos_top_logprob,
        kosmos_token_logprob,
        kosmos_event,
    )
}

# enum kosmos_event_kind
EVENT_TEXT, EVENT_DONE, EVENT_FAILED = 0, 1, 2
# enum kosmos_finish_reason, as OpenAI spells them
FINISH_REASONS = {0: "stop", 1: "length", 2: "cancelled"}
# KOSMOS_SPECULATE_*
SPECULATE = {"auto": 0, "fixed": 1, "adaptive": 2}
# KOSMOS_CONSTRAINT_*
CONSTRAINT_NONE, CONSTRAINT_JSON_OBJECT, CONSTRAINT_JSON_SCHEMA, CONSTRAINT_REGEX, CONSTRAINT_GRAMMAR = range(
    5
)

token_callback = CFUNCTYPE(c_bool, c_char_p, c_void_p)
event_callback = CFUNCTYPE(c_bool, POINTER(kosmos_event), c_void_p)

_PROTOTYPES = {
    "kosmos_last_error": (c_char_p, []),
    "kosmos_abi_version": (c_uint32, []),
    "kosmos_version": (c_char_p, []),
    "kosmos_params_init": (c_int, [POINTER(kosmos_params), c_size_t]),
    "kosmos_model_open": (c_int, [c_char_p, c_char_p, POINTER(c_void_p)]),
    "kosmos_model_set_speculation": (c_int, [c_void_p, c_uint32, c_uint32, c_uint32, c_uint32]),
    "kosmos_model_set_draft": (c_int, [c_void_p, c_char_p, c_char_p, c_float]),
    "kosmos_model_free": (c_int, [c_void_p]),
    "kosmos_generate": (
        c_int,
        [
            c_void_p,
            c_char_p,
            POINTER(kosmos_image),
            c_size_t,
            POINTER(kosmos_params),
            token_callback,
            c_void_p,
            POINTER(c_void_p),
        ],
    ),
    "kosmos_score": (
        c_int,
        [
            c_void_p,
            c_char_p,
            POINTER(kosmos_image),
            c_size_t,
            c_bool,
            POINTER(POINTER(c_uint32)),
            POINTER(POINTER(c_float)),
            POINTER(c_size_t),
        ],
    ),
    "kosmos_logprobs_free": (None, [POINTER(c_float), c_size_t]),
    "kosmos_shutdown": (c_int, []),
    "kosmos_string_free": (None, [c_void_p]),
    "kosmos_engine_config_init": (c_int, [POINTER(kosmos_engine_config), c_size_t]),
    "kosmos_engine_open": (
        c_int,
        [c_char_p, c_char_p, POINTER(kosmos_engine_config), POINTER(c_void_p)],
    ),
    "kosmos_engine_submit": (
        c_int,
        [
            c_void_p,
            c_char_p,
            POINTER(kosmos_image),
            c_size_t,
            POINTER(kosmos_params),
            event_callback,
            c_void_p,
            POINTER(c_uint64),
        ],
    ),
    "kosmos_engine_cancel": (c_int, [c_void_p, c_uint64]),
    "kosmos_engine_free": (c_int, [c_void_p]),
    "kosmos_tokenizer_open": (c_int, [c_char_p, POINTER(c_void_p)]),
    "kosmos_tokenizer_free": (c_int, [c_void_p]),
    "kosmos_tokenize": (
        c_int,
        [c_void_p, c_char_p, c_bool, POINTER(POINTER(c_uint32)), POINTER(c_size_t)],
    ),
    "kosmos_tokens_free": (None, [POINTER(c_uint32), c_size_t]),
    "kosmos_detokenize": (c_int, [c_void_p, POINTER(c_uint32), c_size_t, POINTER(c_void_p)]),
    "kosmos_chat_prompt": (
        c_int,
        [c_void_p, c_char_p, c_bool, c_bool, POINTER(c_void_p), POINTER(c_size_t)],
    ),
}


def library_path() -> Path:
    """Where libkosmos_rt.so is: $KOSMOS_RT_LIB, else the copy a wheel bundles beside this file,
    else a checkout's newest `cargo build` (target/release or target/debug)."""
    env = os.environ.get(LIBRARY_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise ImportError(f"{LIBRARY_ENV}={env}: no such file")
        return path
    bundled = Path(__file__).with_name("libkosmos_rt.so")
    if bundled.is_file():
        return bundled
    checkout = Path(__file__).resolve().parents[2] / "target"
    built = [p for p in (checkout / "release", checkout / "debug") if (p / "libkosmos_rt.so").is_file()]
    if built:
        return max(built, key=lambda p: (p / "libkosmos_rt.so").stat().st_mtime) / "libkosmos_rt.so"
    raise ImportError(
        "libkosmos_rt.so not found: install the wheel scripts/python_wheel.sh builds, or build it "
        f"(cargo build --release -p kosmos-rt --lib) and set {LIBRARY_ENV} to its path"
    )


def _point_at_onnxruntime() -> None:
    """The library loads ONNX Runtime from $ORT_DYLIB_PATH; when that is unset and the
    onnxruntime wheel is installed, use the wheel's copy (the version the toolchain pins)."""
    if os.environ.get("ORT_DYLIB_PATH"):
        return
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return
    for location in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(location, "capi", "libonnxruntime.so.*")))
        if found:
            os.environ["ORT_DYLIB_PATH"] = found[-1]
            return


def load() -> ctypes.CDLL:
    path = library_path()
    _point_at_onnxruntime()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise ImportError(f"cannot load {path}: {e}") from e
    for name, (restype, argtypes) in _PROTOTYPES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as e:
            raise ImportError(f"{path} has no {name}: not a libkosmos_rt built for ABI {ABI_VERSION}") from e
        fn.restype = restype
        fn.argtypes = argtypes
    abi = lib.kosmos_abi_version()
    if abi != ABI_VERSION:
        raise ImportError(f"{path} implements kosmos ABI {abi}; these bindings need ABI {ABI_VERSION}")
    return lib


lib = load()
