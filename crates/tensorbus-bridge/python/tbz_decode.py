"""Decode bridged tensorbus tensors with plain eclipse-zenoh and numpy.

No tensorbus package is needed: this is the wire format of docs/bridge.md
("Wire format"), version 1, read with `struct`. Use `decode()` in your own
subscriber, or run this file to print one JSON line per received tensor:

    python tbz_decode.py --connect tcp/127.0.0.1:7447 --key 'tensorbus/**' --count 10
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from typing import Any

import numpy as np

MAGIC = b"TBZT"
VERSION = 1
FIXED = struct.Struct("<4sBBBBQQQIB3sQ")  # 48 bytes, little-endian
assert FIXED.size == 48

# tensorbus dtype codes -> numpy dtypes. numpy has no bfloat16: its bits are
# returned as uint16 (view them with ml_dtypes.bfloat16 if you have it).
DTYPES = {
    1: ("bool", np.dtype(np.bool_)),
    2: ("u8", np.dtype("<u1")),
    3: ("i8", np.dtype("<i1")),
    4: ("u16", np.dtype("<u2")),
    5: ("i16", np.dtype("<i2")),
    6: ("u32", np.dtype("<u4")),
    7: ("i32", np.dtype("<i4")),
    8: ("u64", np.dtype("<u8")),
    9: ("i64", np.dtype("<i8")),
    10: ("f16", np.dtype("<f2")),
    11: ("bf16", np.dtype("<u2")),
    12: ("f32", np.dtype("<f4")),
    13: ("f64", np.dtype("<f8")),
}


class WireError(ValueError):
    """A sample that is not a valid version-1 tensorbus sample."""


def decode(attachment: bytes, payload: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    """Returns (array, meta). The array is a read-only strided view of
    `payload` with the sender's dtype, shape and strides."""
    if len(attachment) < FIXED.size:
        raise WireError(f"attachment is {len(attachment)} bytes, at least 48 needed")
    (magic, version, encoding, code, ndim, nbytes, seq, ts, producer, user_len,
     reserved, sent_ns) = FIXED.unpack_from(attachment, 0)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}")
    if version != VERSION:
        raise WireError(f"unknown version {version}")
    transform, compression = encoding & 0x0F, encoding >> 4
    if transform > 2 or compression > 1:
        raise WireError(f"unknown payload encoding {encoding:#x}")
    if code not in DTYPES:
        raise WireError(f"unknown dtype code {code}")
    if ndim > 8 or user_len > 64 or reserved != b"\0\0\0":
        raise WireError("ndim, user_len or reserved bytes out of range")
    params_len = 8 if transform == 1 else 0
    if len(attachment) != 48 + 12 * ndim + user_len + params_len:
        raise WireError("attachment length does not match ndim, user_len and encoding")
    shape = struct.unpack_from(f"<{ndim}I", attachment, 48)
    strides = struct.unpack_from(f"<{ndim}q", attachment, 48 + 4 * ndim)
    user = attachment[48 + 12 * ndim:48 + 12 * ndim + user_len]
    numel = int(np.prod(shape, dtype=np.uint64)) if ndim else 1
    want = {0: nbytes, 1: numel, 2: 2 * numel}[transform]
    if compression == 1:
        try:
            import lz4.block  # the `lz4` package; not needed for uncompressed routes
        except ImportError as e:
            raise WireError("an lz4 route: install the `lz4` package to decode it") from e
        payload = lz4.block.decompress(payload, uncompressed_size=want)
    if len(payload) != want:
        raise WireError(f"payload is {len(payload)} bytes, the header says {want}")
    if transform == 1:  # int8 with scale and zero point, back to float32
        scale, zero_point = struct.unpack_from("<fi", attachment, 48 + 12 * ndim + user_len)
        q = np.frombuffer(payload, dtype=np.int8).astype(np.float32)
        payload = ((q - np.float32(zero_point)) * np.float32(scale)).astype("<f4").tobytes()
    elif transform == 2:  # float16 back to float32
        payload = np.frombuffer(payload, dtype="<f2").astype("<f4").tobytes()
    name, dtype = DTYPES[code]
    # Every byte the view can touch must lie in the payload.
    if any(s < 0 for s in strides):
        raise WireError("negative stride")
    if 0 not in shape:
        span = sum((e - 1) * s for e, s in zip(shape, strides)) + dtype.itemsize
        if span > nbytes:
            raise WireError(f"shape and strides reach byte {span}, payload has {nbytes}")
    # A read-only strided view of the payload itself (bytes are immutable).
    array = np.ndarray(shape=shape, dtype=dtype, buffer=payload, strides=strides)
    meta = {"dtype": name, "shape": list(shape), "strides": list(strides),
            "nbytes": nbytes, "seq": seq, "timestamp_ns": ts, "producer": producer,
            "user": user.hex(), "sent_ns": sent_ns}
    return array, meta


def weighted_sum(data: bytes) -> int:
    """sum(byte[i] * (i % 65521 + 1)) mod 2**64: a position-sensitive
    checksum numpy computes at memory speed (the Rust test computes the same)."""
    b = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
    w = np.arange(len(b), dtype=np.uint64) % np.uint64(65521) + np.uint64(1)
    return int(np.sum(b * w, dtype=np.uint64))


def main() -> int:
    import zenoh

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connect", required=True, help="a Zenoh endpoint, e.g. tcp/127.0.0.1:7447")
    ap.add_argument("--key", default="tensorbus/**")
    ap.add_argument("--count", type=int, default=1)
    args = ap.parse_args()
    conf = zenoh.Config()
    conf.insert_json5("mode", json.dumps("peer"))
    conf.insert_json5("connect/endpoints", json.dumps([args.connect]))
    conf.insert_json5("listen/endpoints", "[]")
    conf.insert_json5("scouting/multicast/enabled", "false")
    with zenoh.open(conf) as session:
        sub = session.declare_subscriber(args.key)
        for _ in range(args.count):
            sample = sub.recv()
            att = sample.attachment
            array, meta = decode(att.to_bytes() if att is not None else b"",
                                 sample.payload.to_bytes())
            # The elements in C order, as numpy reads them through the strides.
            meta["key"] = str(sample.key_expr)
            meta["c_order_wsum"] = weighted_sum(np.ascontiguousarray(array).tobytes())
            meta["numpy_shape"] = list(array.shape)
            meta["numpy_dtype"] = str(array.dtype)
            print(json.dumps(meta), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
