"""Just enough PNG to compare screenshots: decode 8-bit RGB/RGBA, non-interlaced (Chromium's)."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Image:
    width: int
    height: int
    channels: int
    rows: list[bytes]


def decode(data: bytes) -> Image:
    if not data.startswith(MAGIC):
        raise ValueError("not a PNG")
    pos, idat = len(MAGIC), bytearray()
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or colour not in (2, 6) or interlace:
                raise ValueError(f"unsupported PNG: depth {depth}, colour {colour}")
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    raw = zlib.decompress(bytes(idat))
    stride = width * channels
    rows: list[bytes] = []
    prior = bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        filt, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if filt == 1:
            for i in range(channels, stride):
                line[i] = (line[i] + line[i - channels]) & 0xFF
        elif filt == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prior, strict=True))
        elif filt == 3:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                line[i] = (line[i] + ((left + prior[i]) >> 1)) & 0xFF
        elif filt == 4:
            for i in range(stride):
                a = line[i - channels] if i >= channels else 0
                b = prior[i]
                c = prior[i - channels] if i >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        elif filt != 0:
            raise ValueError(f"bad filter {filt} in row {y}")
        prior = bytes(line)
        rows.append(prior)
    return Image(width, height, channels, rows)


def diff_ratio(a: Image, b: Image, threshold: int = 48) -> float:
    """The share of pixels where some colour channel differs by more than `threshold`."""
    if (a.width, a.height) != (b.width, b.height):
        return 1.0
    channels = min(a.channels, b.channels, 3)
    differing = 0
    for row_a, row_b in zip(a.rows, b.rows, strict=True):
        if row_a == row_b and a.channels == b.channels:
            continue
        for x in range(a.width):
            pa, pb = x * a.channels, x * b.channels
            if any(abs(row_a[pa + c] - row_b[pb + c]) > threshold for c in range(channels)):
                differing += 1
    return differing / (a.width * a.height)
