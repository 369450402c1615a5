"""Python bindings of libkosmos_rt: run KOSMOS-1 packages made by `kosmos-export`.

    import kosmos_rt
    model = kosmos_rt.Model("pkg/tiny")                       # one generation at a time
    print(model.generate("", images=["a.png"], max_tokens=16))  # a caption
    with kosmos_rt.Engine("pkg/tiny", max_batch=8) as engine:  # continuous batching
        print(engine.generate("Question: what shape is it? Answer:", images=["a.png"]).text)

A thin layer over the C ABI (runtime/include/kosmos_rt.h) through ctypes: the library is
found at $KOSMOS_RT_LIB, bundled in the wheel, or in a checkout's target/; ONNX Runtime at
$ORT_DYLIB_PATH or in the installed onnxruntime wheel.
"""

from ._lib import ABI_VERSION
from ._lib import lib as _libc
from .engine import Completion, Engine, Request, TokenLogprob
from .errors import (
    ContextLengthError,
    ExecutionError,
    ImageError,
    InternalError,
    InvalidArgumentError,
    InvalidHandleError,
    KosmosError,
    PackageError,
    ProviderError,
    RequestFailed,
)
from .model import Model, Scored
from .tokenizer import Tokenizer

#: The library's version (the Rust workspace's).
__version__ = _libc.kosmos_version().decode()

__all__ = [
    "ABI_VERSION",
    "Completion",
    "ContextLengthError",
    "Engine",
    "ExecutionError",
    "ImageError",
    "InternalError",
    "InvalidArgumentError",
    "InvalidHandleError",
    "KosmosError",
    "Model",
    "PackageError",
    "ProviderError",
    "Request",
    "RequestFailed",
    "Scored",
    "TokenLogprob",
    "Tokenizer",
]
