"""The exceptions of tensorbus. Every one is a :class:`TensorbusError`."""

__all__ = [
    "TensorbusError",
    "BrokerUnavailable",
    "PermissionDenied",
    "ProtocolError",
    "ChannelNotFound",
    "InvalidArgument",
    "LimitReached",
    "PoolExhausted",
    "TooLarge",
    "Timeout",
    "EndOfStream",
    "ShapeError",
    "Corrupted",
    "Busy",
    "Closed",
    "Released",
    "ReadOnly",
    "ForkedChild",
]


class TensorbusError(Exception):
    """Base class of every tensorbus error."""


class BrokerUnavailable(TensorbusError, ConnectionError):
    """No broker listens at the socket path, or it went away."""


class PermissionDenied(TensorbusError, PermissionError):
    """The broker refused this process or request."""


class ProtocolError(TensorbusError):
    """The broker answered something unexpected (version mismatch?)."""


class ChannelNotFound(TensorbusError, LookupError):
    """No channel of that name (declare it in the broker config or pass create=True)."""


class InvalidArgument(TensorbusError, ValueError):
    """A name, option or call does not fit."""


class LimitReached(TensorbusError):
    """A fixed limit (handles, producers or subscribers per channel, channels, or this process's file descriptors) was reached."""


class PoolExhausted(TensorbusError):
    """Every slot that fits the tensor is held."""


class TooLarge(TensorbusError, ValueError):
    """The tensor is larger than any slot of the channel's pools."""


class Timeout(TensorbusError, TimeoutError):
    """Nothing arrived (or no slot became free, or the broker did not answer a request) in time."""


class EndOfStream(TensorbusError, EOFError):
    """The channel's last producer closed cleanly and everything queued for this consumer was received.

    Raised by ``recv()``, ``try_recv()``, ``recv_async()`` and a stage's
    ``recv_mut()``; ``for t in consumer`` and ``async for`` simply stop. A
    producer that opens later starts a new stream (receiving then finds its
    tensors). A producer that crashed ends nothing: its consumers keep
    waiting. Opt out with ``client.consumer(name, end_of_stream=False)``.
    """


class ShapeError(TensorbusError, ValueError):
    """A shape, dtype, stride or user header is not acceptable."""


class Corrupted(TensorbusError):
    """A queued descriptor or slot header was invalid (the message was skipped)."""


class Busy(TensorbusError):
    """The consumer is being awaited on another event loop (one loop per
    consumer), or the channel to remove is still in use."""


class Closed(TensorbusError, ValueError):
    """The client, producer, consumer or stage is closed."""


class Released(TensorbusError, ValueError):
    """The tensor was already released, published or forwarded."""


class ReadOnly(TensorbusError):
    """Received tensors are read-only."""


class ForkedChild(TensorbusError):
    """The handle was opened by another process before ``fork()``.

    A forked child's inherited clients, producers, consumers, stages and
    tensors are inert: using them raises this, closing them (or their
    destructors) leaves the parent's untouched. Open a new ``Client`` in
    the child.
    """
