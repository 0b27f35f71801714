"""asyncio support: ``await consumer.recv_async()`` and ``async for t in consumer``.

A consumer's readiness fd (an eventfd, see ``Consumer::readiness`` in the Rust
crate) turns readable when a tensor is queued while it is *armed*; a waiter
thread parks on the same futex a blocking ``recv()`` parks on, so the
producers' hot path is unchanged. Here, per consumer and event loop, one
``_Waiters`` watches that fd with ``loop.add_reader`` while any
``recv_async()`` is pending:

* ``recv_async`` tries ``try_recv`` first; only if nothing is queued does it
  queue a future and make sure the fd is armed and watched.
* When the fd turns readable, *one* waiter is woken (or all, if the consumer
  was closed). The woken task receives by itself when it runs, so a task
  cancelled meanwhile loses no tensor: it only hands the turn on.
* The fd is re-armed only once no woken waiter is still to run (no
  thundering herd); with no waiter left, the reader is removed and the fd
  disarmed.
* At the end of the stream the fd turns readable too: the woken waiter's
  ``try_recv`` raises ``EndOfStream``, and the fd, re-armed for the next
  waiter, is readable again at once, so every waiter gets it in turn.
"""

from __future__ import annotations

import asyncio
import collections
import math
import weakref
from typing import Any, Deque, Optional, Set

from ._errors import Busy, Closed, EndOfStream, Timeout

if issubclass(Timeout, asyncio.TimeoutError):  # Python 3.11+: the same class as TimeoutError
    _Timeout = Timeout
else:

    class _Timeout(Timeout, asyncio.TimeoutError):  # type: ignore[no-redef]
        """tb.Timeout that ``except asyncio.TimeoutError`` also catches (Python < 3.11)."""


# Consumer -> its _Waiters while some recv_async() is pending.
_active: "weakref.WeakKeyDictionary[Any, _Waiters]" = weakref.WeakKeyDictionary()


class _Waiters:
    """The pending ``recv_async()`` calls of one consumer on one event loop."""

    def __init__(self, consumer: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.consumer = weakref.ref(consumer)
        self.ready = consumer._readiness()
        self.fd: int = self.ready.fileno()
        self.loop = loop
        self.queue: Deque[asyncio.Future[None]] = collections.deque()
        # Woken waiters whose task has not tried to receive yet.
        self.turns: Set[asyncio.Future[None]] = set()
        self.reading = False

    @property
    def live(self) -> bool:
        return self.reading or bool(self.turns)

    def wait(self) -> "asyncio.Future[None]":
        """A future that is set when it is this waiter's turn to try."""
        fut: asyncio.Future[None] = self.loop.create_future()
        self.queue.append(fut)
        if not self.reading:
            self.loop.add_reader(self.fd, self._readable)
            self.reading = True
            _active[self.consumer()] = self
        if not self.turns:
            self.ready.arm()
        return fut

    def _readable(self) -> None:
        self.ready.clear()
        wake_all = self.ready.closed
        while self.queue:
            fut = self.queue.popleft()
            if fut.done():  # timed out or cancelled: its task calls forget()
                continue
            fut.set_result(None)
            self.turns.add(fut)
            if not wake_all:
                return
        self._settle()

    def tried(self, fut: "asyncio.Future[None]") -> None:
        """A woken waiter tried to receive."""
        self.turns.discard(fut)
        self._settle()

    def forget(self, fut: "asyncio.Future[None]") -> None:
        """A waiter gave up (timeout or cancellation); a woken one hands its turn on."""
        try:
            self.queue.remove(fut)
        except ValueError:
            self.turns.discard(fut)
        self._settle()

    def _settle(self) -> None:
        if self.turns:
            return
        if self.queue:
            self.ready.arm()
        elif self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)
            self.ready.disarm()
            consumer = self.consumer()
            if consumer is not None and _active.get(consumer) is self:
                del _active[consumer]


def _waiters(consumer: Any, loop: asyncio.AbstractEventLoop) -> _Waiters:
    w = _active.get(consumer)
    if w is not None and w.live:
        if w.loop is loop:
            return w
        if not w.loop.is_closed():
            raise Busy(
                "this consumer is being awaited on another event loop; "
                "use one consumer per event loop"
            )
    return _Waiters(consumer, loop)


def _seconds(timeout: Any) -> Optional[float]:
    if timeout is None:
        return None
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}") from None
    if math.isnan(t) or t < 0:
        raise ValueError(f"timeout must be a non-negative number of seconds or None, not {t}")
    return None if math.isinf(t) else t


def _expire(fut: "asyncio.Future[None]", channel: str, timeout: Optional[float]) -> None:
    if not fut.done():
        fut.set_exception(_Timeout(f"no tensor arrived on {channel!r} within {timeout} s"))


async def recv_async(consumer: Any, timeout: Any = None) -> Any:
    """``await consumer.recv_async(timeout=None)``: see ``Consumer.recv_async``."""
    seconds = _seconds(timeout)
    t = consumer.try_recv()  # raises Closed
    if t is not None:
        return t
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    w = _waiters(consumer, loop)
    fut = w.wait()
    while True:
        timer = None
        if deadline is not None:
            timer = loop.call_at(deadline, _expire, fut, consumer.channel, seconds)
        try:
            await fut
        except BaseException:
            # Timeout (set by _expire) or cancellation of the awaiting task.
            w.forget(fut)
            # The future holds the exception, whose traceback holds this
            # frame, which holds the future: break that cycle, so that the
            # consumer (a local here) is freed by reference counting when
            # the caller lets go of it, not by the cycle collector later.
            del fut
            raise
        finally:
            if timer is not None:
                timer.cancel()
        try:
            t = w.ready.try_recv()  # raises Closed once the consumer is closed
        except BaseException:
            w.tried(fut)
            raise
        if t is not None:
            w.tried(fut)
            return t
        if deadline is not None and loop.time() >= deadline:
            w.tried(fut)
            raise _Timeout(f"no tensor arrived on {consumer.channel!r} within {seconds} s")
        # Someone else took it: queue again before handing the turn on.
        turn, fut = fut, w.wait()
        w.tried(turn)


async def anext(consumer: Any) -> Any:
    """``async for t in consumer``: the next tensor; stops at the end of the
    stream or once the consumer is closed."""
    if consumer.closed:
        raise StopAsyncIteration
    try:
        return await recv_async(consumer)
    except (Closed, EndOfStream):
        raise StopAsyncIteration from None
