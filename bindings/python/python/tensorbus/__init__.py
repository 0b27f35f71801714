"""tensorbus: zero-copy tensor IPC between processes on one host.

A broker creates shared-memory pools of tensor slots; producers loan a slot,
write the tensor in place and publish it; consumers receive a read-only view
of the very same bytes. ``numpy.asarray(t)`` and ``numpy.from_dlpack(t)``
are views of the slot, never copies, and the slot stays held while any of
them is alive.

>>> import numpy as np, tensorbus as tb
>>> client = tb.Client()                                  # $TENSORBUS_SOCKET or the default path
>>> prod = client.producer("camera/raw")
>>> with prod.loan((480, 640, 3), "uint8") as t:
...     np.asarray(t)[:] = frame                          # write straight into shared memory
...     t.publish(user_header=b"cam0")
>>> cons = client.consumer("camera/raw", policy="drop_oldest", depth=4)
>>> with cons.recv(timeout=1.0) as t:
...     x = np.asarray(t)                                 # read-only, zero-copy
"""

from . import _errors
from ._errors import *  # noqa: F403 (every exception; _errors.__all__ lists them)
from ._tensorbus import (
    DTYPES,
    MAX_DIMS,
    USER_HEADER_LEN,
    Broker,
    Client,
    Consumer,
    Producer,
    Stage,
    Tensor,
    socket_path,
)

__version__ = "0.1.0"

__all__ = [
    "Broker",
    "Client",
    "Producer",
    "Consumer",
    "Stage",
    "Tensor",
    "socket_path",
    "DTYPES",
    "MAX_DIMS",
    "USER_HEADER_LEN",
]
__all__ += _errors.__all__  # the exceptions, listed once in _errors
