"""Not a test module: typical use of the API, type-checked by mypy --strict
against the stubs (bindings/python/test.sh). Never imported by pytest."""

from __future__ import annotations

import asyncio
from typing import List, Optional

import tensorbus as tb


def produce(client: tb.Client) -> int:
    prod: tb.Producer = client.producer("camera/raw", create=True, mode="broadcast")
    with prod.loan((480, 640, 3), "uint8", timeout=1.0) as t:
        t.user_header = b"cam0"
        delivered: int = t.publish()
        seq: int = t.seq
        ts: int = t.timestamp_ns
    return delivered + seq + ts


def consume(client: tb.Client) -> List[int]:
    cons: tb.Consumer = client.consumer("camera/raw", policy="drop_oldest", depth=4, wait_strategy="spin")
    seqs: List[int] = []
    with cons.recv(timeout=1.0) as t:
        seqs.append(t.seq)
        shape: tuple[int, ...] = t.shape
        seqs.extend(shape)
    maybe: Optional[tb.Tensor] = cons.try_recv()
    if maybe is not None:
        maybe.release()
    for t in cons:
        seqs.append(t.seq)
        break
    return seqs


async def consume_async(cons: tb.Consumer) -> int:
    t: tb.Tensor = await cons.recv_async(timeout=0.5)
    async for u in cons:
        u.release()
        break
    return t.seq


def stage(client: tb.Client, other: tb.Producer) -> int:
    s = client.stage("model/input", "model/normalized", depth=4)
    with s.recv_mut(timeout=1.0) as t:
        if t.nbytes == 0:
            return t.forward()
        return t.forward("model/debug") if t.ndim else t.forward(other)


def late_join(client: tb.Client) -> List[int]:
    prod = client.producer("camera/calib", create=True, history=1)
    prod.close()
    cons = client.consumer("camera/later", wait=True)
    timed = client.consumer("camera/later", wait=2.5, wait_strategy="park", end_of_stream=False)
    timed.close()
    s = client.stage("model/input", "model/normalized", wait=10, end_of_stream=True)
    s.close()
    seqs: List[int] = []
    while True:
        try:
            seqs.append(cons.recv(timeout=1.0).seq)
        except tb.EndOfStream:
            break
    client.remove_channel("camera/calib")
    ch: dict[str, object] = client.stat()["channels"][0]
    print(ch["history"], ch["history_held"], ch["ended"], ch["pending"])
    return seqs


def errors(client: tb.Client) -> str:
    try:
        client.consumer("nope")
    except tb.ChannelNotFound as e:
        return str(e)
    except tb.TensorbusError:
        return "other"
    return ""


def main() -> None:
    with tb.Broker(None, tb.socket_path()) as b, tb.Client(b.socket, name="typing") as c:
        produce(c)
        consume(c)
        asyncio.run(consume_async(c.consumer("camera/raw")))
        stage(c, c.producer("model/debug"))
        errors(c)
        late_join(c)
        print(c.stat()["pools"], tb.DTYPES, tb.MAX_DIMS, tb.USER_HEADER_LEN)
