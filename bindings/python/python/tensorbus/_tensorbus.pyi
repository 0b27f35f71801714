"""Type stubs of the native module (re-exported by ``tensorbus``).

Checked against the compiled module by ``python -m mypy.stubtest tensorbus``
(bindings/python/test.sh runs it).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, AsyncIterator, Iterator, Literal, Optional, Sequence, Tuple, Union, final

# Stub-only aliases (not present at runtime).
_DTypeLike = Union[str, Any]  # "uint8", "float32", "bfloat16", numpy dtypes and scalar types
_ShapeLike = Union[int, Sequence[int]]
_Policy = Literal["block", "drop_oldest", "drop_newest", "latest"]
_Mode = Literal["broadcast", "workqueue"]
_Wait = Literal["spin", "busy", "park"]
_PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "Broker",
    "Client",
    "Producer",
    "Consumer",
    "Stage",
    "Tensor",
    "_Export",
    "_Readiness",
    "_StructProbe",
    "socket_path",
    "MAX_DIMS",
    "USER_HEADER_LEN",
    "DTYPES",
]

DTYPES: Tuple[str, ...]
MAX_DIMS: int
USER_HEADER_LEN: int

def socket_path() -> pathlib.Path:
    """The default broker socket path ($TENSORBUS_SOCKET, then the runtime dir)."""

@final
class Broker:
    """A broker on a thread of this process (tests, demos, one-process pipelines).

    `config`: TOML text, or the path of a TOML file (a str naming an existing
    file, or an os.PathLike); anything else raises ValueError ("expected TOML
    text or a path to a TOML file"). Default: the built-in pools."""

    def __new__(
        cls,
        config: Optional[_PathLike] = None,
        socket: Optional[_PathLike] = None,
        *,
        config_file: Optional[_PathLike] = None,
    ) -> Broker: ...
    @property
    def socket(self) -> pathlib.Path: ...
    @property
    def running(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> Broker: ...
    def __exit__(self, *_args: object) -> Literal[False]: ...

@final
class Client:
    """A connection to a broker; closing it closes every handle opened from it."""

    def __new__(cls, socket: Optional[_PathLike] = None, name: Optional[str] = None) -> Client: ...
    @property
    def id(self) -> int: ...
    @property
    def socket(self) -> pathlib.Path: ...
    @property
    def closed(self) -> bool: ...
    def producer(
        self,
        channel: str,
        *,
        pools: Optional[Sequence[str]] = None,
        mode: Optional[_Mode] = None,
        create: bool = False,
        history: int = 0,
    ) -> Producer:
        """Opens a producer; with create=True the channel is made if missing
        (pools, mode, and history: the last N tensors a late subscriber
        receives first, broadcast only)."""
    def consumer(
        self,
        channel: str,
        *,
        policy: Optional[_Policy] = None,
        depth: Optional[int] = None,
        wait: Union[bool, float, None, _Wait] = None,
        wait_strategy: Optional[_Wait] = None,
        create: bool = False,
        pools: Optional[Sequence[str]] = None,
        mode: Optional[_Mode] = None,
        history: int = 0,
        end_of_stream: bool = True,
    ) -> Consumer:
        """Subscribes. wait=True (forever) or seconds: wait for the channel to
        be created (Timeout when it is not in time; Ctrl-C interrupts);
        False/None/0: ChannelNotFound at once. A str wait= is the wait
        strategy (deprecated: use wait_strategy=). end_of_stream=False: never
        raise EndOfStream."""
    def stage(
        self,
        input: str,
        output: str,
        *,
        depth: Optional[int] = None,
        wait: Union[bool, float, None] = None,
        end_of_stream: bool = True,
    ) -> Stage:
        """Opens a stage; wait=True or seconds waits for the input channel
        (Ctrl-C interrupts the wait)."""
    def remove_channel(self, channel: str) -> None:
        """Removes a run-time-created channel: ChannelNotFound if unknown,
        Busy while in use, PermissionDenied when the config declares it."""
    def stat(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Client: ...
    def __exit__(self, *_args: object) -> Literal[False]: ...

@final
class Producer:
    @property
    def channel(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def loan(
        self,
        shape: _ShapeLike,
        dtype: Optional[_DTypeLike] = None,
        *,
        timeout: Optional[float] = None,
    ) -> Tensor:
        """A writable slot for a C-contiguous tensor (dtype default: uint8).

        Extents are ints in 0..2**32-1 (ShapeError otherwise). A producer may
        have several loans out at once, each its own slot."""
    def close(self) -> None: ...
    def __enter__(self) -> Producer: ...
    def __exit__(self, *_args: object) -> Literal[False]: ...

@final
class Consumer:
    @property
    def channel(self) -> str: ...
    @property
    def policy(self) -> _Policy: ...
    @property
    def depth(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def dropped(self) -> int:
        """Tensors producers dropped for this subscriber since it subscribed
        (drop_oldest, drop_newest, latest; always 0 under block). After
        close(): the final count, as of the close."""
    @property
    def received(self) -> int:
        """Tensors this subscriber has received since it subscribed. After
        close(): the final count, as of the close."""
    def recv(self, timeout: Optional[float] = None) -> Tensor:
        """Waits (GIL released, Ctrl-C interrupts) for the next tensor; raises
        Timeout, or EndOfStream once the last producer closed and the queue
        is drained."""
    def try_recv(self) -> Optional[Tensor]:
        """The next queued tensor or None; EndOfStream at the end of the stream."""
    async def recv_async(self, timeout: Optional[float] = None) -> Tensor:
        """asyncio: awaits the next tensor without blocking the loop (the
        consumer's readiness eventfd is watched with loop.add_reader).
        Raises Timeout after `timeout` seconds, EndOfStream at the end of
        the stream, Closed if the consumer is closed meanwhile; a cancelled
        call loses no tensor."""
    def __iter__(self) -> Iterator[Tensor]: ...
    def __next__(self) -> Tensor: ...
    def __aiter__(self) -> AsyncIterator[Tensor]: ...
    async def __anext__(self) -> Tensor: ...
    def _readiness(self) -> _Readiness: ...
    def close(self) -> None:
        """Unsubscribes at once (a thread blocked in recv() raises Closed);
        received tensors stay valid until released."""
    def __enter__(self) -> Consumer: ...
    def __exit__(self, *_args: object) -> Literal[False]: ...

@final
class _Readiness:
    """A consumer's readiness eventfd (internal: used by recv_async)."""

    def fileno(self) -> int: ...
    def arm(self) -> None: ...
    def disarm(self) -> None: ...
    def clear(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def try_recv(self) -> Optional[Tensor]: ...

@final
class Stage:
    @property
    def input(self) -> str: ...
    @property
    def output(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def recv_mut(self, timeout: Optional[float] = None) -> Tensor:
        """Takes the next input tensor exclusively and writable; raises
        Timeout, or EndOfStream at the end of the input's stream. A stage
        may hold several staged tensors at once."""
    def close(self) -> None:
        """Leaves the input at once, also while staged tensors are alive
        (they stay valid and can still be forwarded)."""
    def __enter__(self) -> Stage: ...
    def __exit__(self, *_args: object) -> Literal[False]: ...

@final
class Tensor:
    """A slot: loan (writable), received (read-only) or staged (writable).

    Zero-copy views: ``numpy.asarray(t)`` and ``numpy.from_dlpack(t)``.
    ``memoryview(t)`` is not supported (TypeError): this abi3 wheel for
    CPython 3.9+ cannot offer the buffer protocol, which the limited API has
    only since 3.11; use ``memoryview(numpy.asarray(t))``.
    """

    @property
    def shape(self) -> Tuple[int, ...]: ...
    @property
    def strides(self) -> Tuple[int, ...]: ...
    @property
    def ndim(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def itemsize(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def seq(self) -> int: ...
    @property
    def timestamp_ns(self) -> int: ...
    @property
    def producer(self) -> int: ...
    @property
    def user_header(self) -> bytes: ...
    @user_header.setter
    def user_header(self, value: bytes) -> None: ...
    @property
    def address(self) -> int: ...
    @property
    def writable(self) -> bool: ...
    @property
    def kind(self) -> Literal["loan", "received", "staged"]: ...
    @property
    def released(self) -> bool: ...
    @property
    def exports(self) -> int: ...
    @property
    def slot(self) -> Tuple[int, int, int]: ...
    def publish(self, user_header: Optional[bytes] = None) -> int:
        """Publishes a loan; returns how many received it. Afterwards
        ``seq`` and ``timestamp_ns`` are the stamps it was published with."""
    def forward(self, to: Union[str, Producer, None] = None) -> int:
        """Forwards a staged tensor (the same slot) on the stage's output,
        on another channel by name, or through a Producer of the same client."""
    def release(self) -> None: ...
    def numpy(self) -> Any: ...
    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> Any: ...
    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Optional[Tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> Tuple[int, int]: ...
    @property
    def __array_struct__(self) -> Any:
        """numpy's fast path (a PyArrayInterface capsule; one export while numpy keeps it)."""
    def __enter__(self) -> Tensor: ...
    def __exit__(
        self, _exc_type: object = None, _exc: object = None, _tb: object = None
    ) -> Literal[False]: ...

@final
class _Export:
    """One numpy export of a tensor (an array's base); holds the slot."""

    @property
    def __array_interface__(self) -> dict[str, Any]: ...

@final
class _StructProbe:
    """Probes once whether numpy keeps an __array_struct__ capsule alive."""

    @property
    def __array_struct__(self) -> Any: ...
