"""Exceptions: one class per `kosmos_status` code, carrying the library's message."""

from __future__ import annotations

from ._lib import lib


class KosmosError(Exception):
    """A failure reported by libkosmos_rt; `status` is its `kosmos_status` code (None for a
    request that failed on the engine's thread)."""

    status = None

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class InvalidArgumentError(KosmosError, ValueError):
    """KOSMOS_ERR_INVALID_ARGUMENT: an out-of-range or malformed setting."""

    status = 1


class InvalidHandleError(KosmosError):
    """KOSMOS_ERR_INVALID_HANDLE: the object was already closed."""

    status = 2


class PackageError(KosmosError):
    """KOSMOS_ERR_PACKAGE: a package file is missing or the files disagree."""

    status = 3


class ImageError(KosmosError, ValueError):
    """KOSMOS_ERR_IMAGE: an image could not be read, is not an image, or is too large."""

    status = 4


class ContextLengthError(KosmosError, ValueError):
    """KOSMOS_ERR_CONTEXT: the prompt plus max_tokens does not fit the model's context."""

    status = 5


class ProviderError(KosmosError):
    """KOSMOS_ERR_PROVIDER: the requested execution provider is not available."""

    status = 6


class ExecutionError(KosmosError):
    """KOSMOS_ERR_RUNTIME: ONNX Runtime failed while running the model."""

    status = 7


class InternalError(KosmosError):
    """KOSMOS_ERR_INTERNAL: a bug in the library, caught at its boundary."""

    status = 8


class RequestFailed(KosmosError):
    """An engine request ended with a FAILED event (its message says why)."""


_BY_STATUS = {
    cls.status: cls
    for cls in (
        InvalidArgumentError,
        InvalidHandleError,
        PackageError,
        ImageError,
        ContextLengthError,
        ProviderError,
        ExecutionError,
        InternalError,
    )
}


def check(status: int) -> None:
    """Raise the exception for a failed call; must run on the calling thread right after the
    call, since the message is thread-local."""
    if status == 0:
        return
    message = (lib.kosmos_last_error() or b"").decode("utf-8", "replace")
    cls = _BY_STATUS.get(status, KosmosError)
    raise cls(message or f"kosmos status {status}", status)
