"""A tensorbus peer process for the cross-process tests.

    peer.py produce SOCKET CHANNEL N DTYPE       publish N tensors (value = seq)
    peer.py consume SOCKET CHANNEL N [POLICY]    receive N, print one JSON line per tensor
    peer.py hold SOCKET CHANNEL N                receive N, keep numpy/DLPack views, wait to be killed
    peer.py stage SOCKET IN OUT N                recv_mut, double in place, forward
    peer.py block SOCKET CHANNEL                 block in recv() until interrupted
    peer.py waitconsume SOCKET CHANNEL           consumer(wait=True): print each tensor's first value, then "end"
    peer.py waitblock SOCKET CHANNEL             block in consumer(wait=True) until interrupted
    peer.py publish_hang SOCKET CHANNEL N        publish N tensors (value = i), then wait to be killed
"""

import json
import sys
import time

import numpy as np

import tensorbus as tb


def value_array(dtype, seq, shape=(3, 5)):
    if dtype == "bfloat16":
        return np.full(shape, 0x3F80 + seq, dtype=np.uint16)  # raw bf16 bits
    if dtype == "bool":
        return np.full(shape, seq % 2 == 1, dtype=np.bool_)
    return np.full(shape, seq % 100, dtype=np.dtype(dtype))


def main():
    role, sock = sys.argv[1], sys.argv[2]
    client = tb.Client(sock, name=f"peer-{role}")
    if role == "produce":
        channel, n, dtype = sys.argv[3], int(sys.argv[4]), sys.argv[5]
        prod = client.producer(channel)
        for i in range(n):
            with prod.loan((3, 5), dtype, timeout=10.0) as t:
                np.asarray(t)[...] = value_array(dtype, i)
                t.publish(user_header=f"peer:{i}".encode())
        print("done", flush=True)
    elif role == "consume":
        channel, n = sys.argv[3], int(sys.argv[4])
        policy = sys.argv[5] if len(sys.argv) > 5 else None
        cons = client.consumer(channel, policy=policy, depth=8)
        print("ready", flush=True)
        for _ in range(n):
            with cons.recv(timeout=20.0) as t:
                a = np.asarray(t)
                print(
                    json.dumps(
                        {
                            "seq": t.seq,
                            "sum": float(a.astype(np.float64).sum()),
                            "first": float(a.reshape(-1)[0]) if a.size else None,
                            "dtype": t.dtype,
                            "shape": list(t.shape),
                            "user_header": t.user_header.decode(),
                            "producer": t.producer,
                            "ts": t.timestamp_ns,
                        }
                    ),
                    flush=True,
                )
                del a
    elif role == "hold":
        channel, n = sys.argv[3], int(sys.argv[4])
        cons = client.consumer(channel, depth=8)
        print("ready", flush=True)
        held = []
        for _ in range(n):
            t = cons.recv(timeout=20.0)
            held.append((t, np.asarray(t), np.from_dlpack(t)))
        print("holding", flush=True)
        time.sleep(600)
    elif role == "stage":
        inp, out, n = sys.argv[3], sys.argv[4], int(sys.argv[5])
        stage = client.stage(inp, out)
        print("ready", flush=True)
        for _ in range(n):
            with stage.recv_mut(timeout=20.0) as t:
                a = np.asarray(t)
                a *= 2
                del a
                t.forward()
        print("done", flush=True)
    elif role == "block":
        cons = client.consumer(sys.argv[3])
        print("ready", flush=True)
        try:
            cons.recv()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
    elif role == "waitconsume":
        cons = client.consumer(sys.argv[3], wait=True)
        for t in cons:  # until end of stream
            with t:
                print(int(np.asarray(t).reshape(-1)[0]), flush=True)
        print("end", flush=True)
    elif role == "waitblock":
        try:
            client.consumer(sys.argv[3], wait=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
    elif role == "publish_hang":
        channel, n = sys.argv[3], int(sys.argv[4])
        prod = client.producer(channel)
        for i in range(n):
            with prod.loan((4,), "uint8", timeout=10.0) as t:
                np.asarray(t)[:] = i
                t.publish()
        print("done", flush=True)
        time.sleep(600)
    else:
        sys.exit(f"unknown role {role}")


if __name__ == "__main__":
    main()
