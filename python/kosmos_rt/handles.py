"""Owning a library handle: close() once, with-blocks, and release at interpreter exit."""

from __future__ import annotations

import atexit
import os
import weakref

from ._lib import lib
from .errors import InvalidHandleError, check

_OPEN = weakref.WeakSet()


class Handle:
    def __init__(self, ptr, free):
        self._ptr = ptr
        self._free = free
        _OPEN.add(self)

    def _live(self):
        if not self._ptr:
            raise InvalidHandleError(f"this {type(self).__name__} is closed")
        return self._ptr

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr:
            check(self._free(ptr))

    @property
    def closed(self) -> bool:
        return not self._ptr

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def package_path(package_dir) -> bytes:
    return os.fsencode(os.fspath(package_dir))


@atexit.register
def _shutdown() -> None:
    # ONNX Runtime's threads must stop before static destructors run (`kosmos_shutdown`), and
    # only after every model and engine is released.
    for handle in list(_OPEN):
        try:
            handle.close()
        except Exception:
            pass
    lib.kosmos_shutdown()
