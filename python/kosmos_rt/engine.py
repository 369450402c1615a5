"""`Engine`: continuous batching over one package (`kosmos_engine_*`); requests from any
thread, or from asyncio, are decoded together."""

from __future__ import annotations

import asyncio
import threading
from ctypes import byref, c_uint64, c_void_p, sizeof
from dataclasses import dataclass, field

from . import _lib
from ._lib import kosmos_engine_config, lib
from ._params import Call, prompt_bytes
from .errors import RequestFailed, check
from .handles import Handle, package_path
from .tokenizer import OwnsTokenizer

#: `Engine(...)` settings (`struct kosmos_engine_config`); left out = the library's default
#: (the server's: 8 rows, 512-token prefill chunks, 256 cached images, a 512 MiB prefix cache).
CONFIG = tuple(name for name, _ in kosmos_engine_config._fields_ if name != "struct_size")


@dataclass
class TokenLogprob:
    """A generated token's log-probability (the model's log-softmax, before temperature and
    penalties) and the most likely alternatives there, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    #: "stop" (`</s>` or a stop string), "length" (max_tokens) or "cancelled".
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    tokens: list[int]
    #: Per generated token when the request asked for `logprobs`, else None.
    logprobs: list[TokenLogprob] | None = None


class Request:
    """A submitted request: iterate it for the text as it is generated (`for piece in req`, or
    `async for`), or wait for its `Completion` (`req.result()`, or `await req`)."""

    def __init__(self, engine: Engine, logprobs: bool):
        self.id = None
        self._engine = engine
        self._want_logprobs = logprobs
        self._cond = threading.Condition()
        self._pieces: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._cancel = False
        self._waiters = []  # (event loop, asyncio.Event) of async consumers

    # -- called on the engine's thread --------------------------------------------------------
    def _on_event(self, ev) -> bool:
        with self._cond:
            text = (ev.text or b"").decode("utf-8", "replace")
            if ev.kind == _lib.EVENT_TEXT:
                self._pieces.append(text)
                for i in range(ev.n_logprobs):
                    lp = ev.logprobs[i]
                    top = [(lp.top[j].token, lp.top[j].logprob) for j in range(lp.n_top)]
                    self._logprobs.append(TokenLogprob(lp.token, lp.logprob, top))
            elif ev.kind == _lib.EVENT_DONE:
                self._completion = Completion(
                    text=text,
                    finish_reason=_lib.FINISH_REASONS.get(ev.finish_reason, str(ev.finish_reason)),
                    prompt_tokens=ev.prompt_tokens,
                    generated_tokens=ev.generated_tokens,
                    tokens=[ev.tokens[i] for i in range(ev.generated_tokens)] if ev.tokens else [],
                    logprobs=list(self._logprobs) if self._want_logprobs else None,
                )
            else:
                self._error = RequestFailed(text)
            self._cond.notify_all()
            waiters = list(self._waiters)
            keep = not self._cancel
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: nobody is waiting there any more
                pass
        return keep

    # -- the caller's side ---------------------------------------------------------------------
    def _finished(self) -> bool:
        return self._completion is not None or self._error is not None

    def done(self) -> bool:
        with self._cond:
            return self._finished()

    def cancel(self) -> None:
        """Stop the request at the engine's next step; its completion says "cancelled"."""
        with self._cond:
            self._cancel = True
            rid = self.id
        if rid is not None and not self._engine.closed:
            check(lib.kosmos_engine_cancel(self._engine._live(), rid))

    def result(self, timeout: float | None = None) -> Completion:
        """The completion, once the request has ended (TimeoutError after `timeout` seconds)."""
        with self._cond:
            if not self._cond.wait_for(self._finished, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            if self._error is not None:
                raise self._error
            return self._completion

    def _drain(self, seen: int):
        """(new pieces from `seen` on, finished?) — under the lock."""
        return self._pieces[seen:], self._finished()

    def __iter__(self):
        seen = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda seen=seen: len(self._pieces) > seen or self._finished())
                new, finished = self._drain(seen)
            seen += len(new)
            yield from new
            if finished and not new:
                break
        self.result()  # raises a failure

    async def _wait_async(self) -> Completion:
        async for _ in self:
            pass
        return self.result()

    def __await__(self):
        return self._wait_async().__await__()

    async def __aiter__(self):
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._cond:
            self._waiters.append(entry)
        try:
            seen = 0
            while True:
                event.clear()
                with self._cond:
                    new, finished = self._drain(seen)
                seen += len(new)
                for piece in new:
                    yield piece
                if finished and not new:
                    break
                if not new:
                    await event.wait()
        finally:
            with self._cond:
                self._waiters.remove(entry)
        self.result()


class Engine(OwnsTokenizer, Handle):
    """Continuous batching over one package exported with `--kv-cache buffer`.

    >>> with kosmos_rt.Engine("pkg/tiny", max_batch=4) as engine:
    ...     reqs = [engine.submit(f"Question: {q} Answer:", images=["a.png"], max_tokens=8) for q in qs]
    ...     print([r.result().text for r in reqs])          # decoded together
    ...     async def main(): return await engine.submit("", images=["a.png"])   # from asyncio

    Settings (keywords; the library's defaults when left out): max_batch, prefill_chunk,
    vision_cache, kv_preallocate, prefix_cache_mb, priority_preemption, speculative_tokens,
    prompt_lookup_max, prompt_lookup_min, speculative_max_batch, speculative_schedule ("auto",
    "fixed", "adaptive"), draft_package (a draft model's package directory: it guesses instead
    of prompt lookup), draft_p_min.
    """

    def __init__(self, package_dir, device: str = "cpu", **settings):
        unknown = sorted(set(settings) - set(CONFIG))
        if unknown:
            raise TypeError(f"unknown engine setting(s): {', '.join(unknown)}; known: {', '.join(CONFIG)}")
        config = kosmos_engine_config()
        check(lib.kosmos_engine_config_init(byref(config), sizeof(config)))
        for name, value in settings.items():
            if value is None:
                continue
            if name == "speculative_schedule":
                if value not in _lib.SPECULATE:
                    raise ValueError(
                        f"speculative_schedule: {value!r} is not one of {', '.join(_lib.SPECULATE)}"
                    )
                value = _lib.SPECULATE[value]
            if name == "draft_package":
                value = package_path(value)
            setattr(config, name, value)
        self._requests = {}
        self._engine_thread = None
        self._lock = threading.Lock()
        self._next_key = 1
        # One C callback for every request, alive as long as the engine; `user_data` is the
        # request's key in `_requests`, never a Python object's address.
        self._callback = _lib.event_callback(self._dispatch)
        out = c_void_p()
        check(lib.kosmos_engine_open(package_path(package_dir), device.encode(), byref(config), byref(out)))
        super().__init__(out.value, lib.kosmos_engine_free)
        self.package_dir = str(package_dir)

    def _dispatch(self, ev_ptr, key) -> bool:
        self._engine_thread = threading.get_ident()
        try:
            ev = ev_ptr.contents
            final = ev.kind != _lib.EVENT_TEXT
            with self._lock:
                request = self._requests.pop(key, None) if final else self._requests.get(key)
            return request._on_event(ev) if request is not None else True
        except BaseException:  # an exception cannot cross the C callback; keep the engine going
            import traceback

            traceback.print_exc()
            return True

    def submit(
        self,
        prompt: str = "",
        images=(),
        *,
        logprobs: int | None = None,
        priority: int | None = None,
        **settings,
    ) -> Request:
        """Queue a request and return at once. `prompt`, `images` and the settings as for
        `Model.generate` (no beams), plus `logprobs` (0-20 alternatives per generated token)
        and `priority` (lower is admitted first, and may take a running request's row)."""
        if "beams" in settings:
            raise TypeError("beams: the engine decodes one beam per request; beam search is Model.generate's")
        settings.update(logprobs=logprobs, priority=priority)
        call = Call(images, settings, extra=("logprobs", "priority"))
        engine = self._live()
        request = Request(self, logprobs is not None)
        with self._lock:
            key, self._next_key = self._next_key, self._next_key + 1
            self._requests[key] = request
        rid = c_uint64()
        status = lib.kosmos_engine_submit(
            engine,
            prompt_bytes(prompt),
            call.images,
            call.n_images,
            byref(call.params),
            self._callback,
            c_void_p(key),
            byref(rid),
        )
        if status != 0:
            with self._lock:
                self._requests.pop(key, None)
            check(status)
        with request._cond:
            request.id = rid.value
            cancel = request._cancel
        if cancel:
            request.cancel()
        return request

    def generate(self, prompt: str = "", images=(), **settings) -> Completion:
        """`submit(...).result()`."""
        return self.submit(prompt, images, **settings).result()

    def submit_chat(
        self,
        messages,
        *,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        **settings,
    ) -> Request:
        """`submit` on the prompt a chat makes (see `Model.chat`)."""
        prompt, images = self.tokenizer.chat_prompt(messages, add_generation_prompt, continue_final_message)
        return self.submit(prompt, images, **settings)

    def chat(self, messages, **settings) -> Completion:
        """`submit_chat(...).result()`."""
        return self.submit_chat(messages, **settings).result()

    def close(self) -> None:
        """Cancel what is still queued or running (each request gets its completion, "cancelled"),
        stop the engine thread and release the engine."""
        if threading.get_ident() == self._engine_thread:
            # A finalizer can run on the engine's own thread, which cannot join itself.
            threading.Thread(target=Engine.close, args=(self,), name="kosmos-engine-close").start()
            return
        super().close()
        self._close_tokenizer()
