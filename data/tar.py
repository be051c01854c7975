"""Samples from a tar stream: regular members grouped by key, the way WebDataset groups them.

We write shards with WebDataset's TarWriter; shards without a member table (`data.members`: latents, shards
written elsewhere) are read with this instead of WebDataset's reader, which parses every header through Python's
tarfile: on our benchmark CPU that cost about 130 us per member, more than decoding a 64x64 JPEG
(benchmarks/RESULTS.md, "Data"). Here the stream is read in chunks of CHUNK bytes and headers are parsed in
place, so a member costs a few slices of one buffer. It reads POSIX ustar headers plus the two
extensions other tools write for long names (pax `path` records, GNU `L` members); other member types (folders,
links) are skipped, as WebDataset skips them. A stream that ends inside a member raises TruncatedTar.
"""
from __future__ import annotations

import struct
from typing import BinaryIO, Iterator

BLOCK = 512
CHUNK = 1 << 16  # 1 MiB reads measured slower: every chunk is a fresh allocation
REGULAR = (ord("0"), 0, ord("7"))
PAX, PAX_GLOBAL, GNU_LONG_NAME = ord("x"), ord("g"), ord("L")
HEADER = struct.Struct("100s24x11s21xB")  # name, the size's usual 11 octal digits, type


class TruncatedTar(EOFError):
    pass


def read_at_least(stream: BinaryIO, rest: bytes, n: int) -> bytes:
    """`rest` followed by the next bytes of the stream: at least n in all, fewer only where the stream ends."""
    parts, have = ([rest] if rest else []), len(rest)
    while have < n:
        # streams (pipes, HTTP bodies) may return less than asked before the end
        data = stream.read(max(CHUNK, n - have))
        if not data:
            break
        parts.append(data)
        have += len(data)
    # one part is returned as it is: joining would copy it
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # base-256, used for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _field(buf: bytes, start: int, length: int) -> bytes:
    """A NUL-terminated header field (unterminated when it fills its length)."""
    end = buf.find(0, start, start + length)
    return buf[start:end if end >= 0 else start + length]


def _pax_path(body: bytes) -> bytes | None:
    path = None
    while body:
        length = int(body.split(b" ", 1)[0])
        record, body = body[:length], body[length:]
        key, _, value = record.split(b" ", 1)[1].partition(b"=")
        if key == b"path":
            path = value[:-1]
    return path


def samples(stream: BinaryIO) -> Iterator[dict]:
    """Consecutive regular members with the same key (name up to the first dot of its last part) as one sample:
    {"__key__": key, extension (lower case): data, ...}. Members and samples in one loop, each header unpacked
    by one struct call: a generator per layer and a slice per field cost about 1 us per sample, a fifth of it."""
    buf, pos, have, long_name = b"", 0, 0, None
    key, sample = None, None
    unpack = HEADER.unpack_from
    while True:
        if have - pos < BLOCK:
            buf, pos = read_at_least(stream, buf[pos:], BLOCK), 0
            have = len(buf)
            if not have:  # end of the stream, cut between members
                break
            if have < BLOCK:
                raise TruncatedTar(f"the tar stream ends inside a header ({have} of {BLOCK} bytes)")
        field, digits, kind = unpack(buf, pos)
        if not field[0] and buf.count(0, pos, pos + BLOCK) == BLOCK:  # end of archive
            break
        try:  # the common form: 11 octal digits and a NUL
            size = int(digits, 8)
        except ValueError:
            size = _number(buf[pos + 124:pos + 136])
        start = pos + BLOCK
        end = start + size + -size % BLOCK  # the data and its padding
        if end > have:
            buf, end, pos = read_at_least(stream, buf[pos:], end - pos), end - pos, 0
            have, start = len(buf), BLOCK
            if end > have:
                got = min(have - BLOCK, size)
                raise TruncatedTar(f"the tar stream ends inside a member ({got} of {size} bytes)")
        if long_name is None and kind in REGULAR:  # the common case first: a name in the header
            name = field.partition(b"\0")[0]
            if buf[pos + 345] and buf.startswith(b"ustar", pos + 257):
                name = _field(buf, pos + 345, 155) + b"/" + name
        elif kind == PAX:
            long_name = _pax_path(buf[start:start + size]) or long_name
            name = None
        elif kind == GNU_LONG_NAME:
            long_name = buf[start:start + size].rstrip(b"\0")
            name = None
        elif kind != PAX_GLOBAL:  # a member named by the pax or GNU record before it, or one we skip
            name = long_name if kind in REGULAR else None
            long_name = None
        else:
            name = None
        if name is not None:
            dot = name.find(b".", name.rfind(b"/") + 1)
            if dot >= 0:
                if name[:dot] != key:
                    if sample is not None:
                        yield sample
                    key = name[:dot]
                    sample = {"__key__": key.decode()}
                sample[name[dot + 1:].decode().lower()] = buf[start:start + size]
        pos = end
    if sample is not None:
        yield sample
