"""Samples from a tar stream: regular members grouped by key, the way WebDataset groups them.

We write shards with WebDataset's TarWriter; we read them with this instead of WebDataset's reader, which parses
every header through Python's tarfile: on our benchmark CPU that cost about 130 us per member, more than decoding a
64x64 JPEG (benchmarks/RESULTS.md, "Data"). Here the stream is read in chunks of CHUNK bytes and headers are
parsed in place, so a member costs a few slices of one buffer. It reads POSIX ustar headers plus the two
extensions other tools write for long names (pax `path` records, GNU `L` members); other member types (folders,
links) are skipped, as WebDataset skips them. A stream that ends inside a member raises TruncatedTar.
"""
from __future__ import annotations

from typing import BinaryIO, Iterator

BLOCK = 512
CHUNK = 1 << 16  # 1 MiB reads measured slower: every chunk is a fresh allocation
REGULAR = (ord("0"), 0, ord("7"))


class TruncatedTar(EOFError):
    pass


def _more(stream: BinaryIO, rest: bytes, n: int) -> bytes:
    """`rest` followed by the next bytes of the stream: at least n in all, fewer only where the stream ends."""
    parts, have = [rest], len(rest)
    while have < n:
        # streams (pipes, HTTP bodies) may return less than asked before the end
        data = stream.read(max(CHUNK, n - have))
        if not data:
            break
        parts.append(data)
        have += len(data)
    return b"".join(parts)


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # base-256, used for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _text(buf: bytes, start: int, length: int) -> str:
    """A NUL-terminated header field (unterminated when it fills its length)."""
    end = buf.find(0, start, start + length)
    return buf[start:end if end >= 0 else start + length].decode()


def _pax_path(body: bytes) -> str | None:
    path = None
    while body:
        length = int(body.split(b" ", 1)[0])
        record, body = body[:length], body[length:]
        key, _, value = record.split(b" ", 1)[1].partition(b"=")
        if key == b"path":
            path = value[:-1].decode()
    return path


def members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular member."""
    buf, pos, long_name = b"", 0, None
    while True:
        if len(buf) - pos < BLOCK:
            buf, pos = _more(stream, buf[pos:], BLOCK), 0
            if not buf:  # end of the stream, cut between members
                return
            if len(buf) < BLOCK:
                raise TruncatedTar(f"the tar stream ends inside a header ({len(buf)} of {BLOCK} bytes)")
        if buf[pos] == 0 and buf.count(0, pos, pos + BLOCK) == BLOCK:  # end of archive
            return
        try:  # the common form: 11 octal digits and a NUL
            size = int(buf[pos + 124:pos + 135], 8)
        except ValueError:
            size = _number(buf[pos + 124:pos + 136])
        end = pos + BLOCK + size + -size % BLOCK  # the data and its padding
        if end > len(buf):
            buf, end, pos = _more(stream, buf[pos:], end - pos), end - pos, 0
            if end > len(buf):
                got = min(len(buf) - BLOCK, size)
                raise TruncatedTar(f"the tar stream ends inside a member ({got} of {size} bytes)")
        kind = buf[pos + 156]
        if kind in REGULAR and long_name is None:  # the common case first: a name in the header
            name = _text(buf, pos, 100)
            if buf[pos + 345] and buf.startswith(b"ustar", pos + 257):
                name = f"{_text(buf, pos + 345, 155)}/{name}"
            yield name, buf[pos + BLOCK:pos + BLOCK + size]
        elif kind == ord("x"):
            long_name = _pax_path(buf[pos + BLOCK:pos + BLOCK + size]) or long_name
        elif kind == ord("L"):
            long_name = buf[pos + BLOCK:pos + BLOCK + size].rstrip(b"\0").decode()
        elif kind != ord("g"):  # a member named by the pax or GNU record before it, or one we skip
            if kind in REGULAR:
                yield long_name, buf[pos + BLOCK:pos + BLOCK + size]
            long_name = None
        pos = end


def samples(stream: BinaryIO) -> Iterator[dict]:
    """Consecutive members with the same key (name up to the first dot of its last part) as one sample:
    {"__key__": key, extension (lower case): data, ...}."""
    sample: dict = {"__key__": None}
    for name, data in members(stream):
        dot = name.find(".", name.rfind("/") + 1)
        if dot < 0:
            continue
        key = name[:dot]
        if sample["__key__"] != key:
            if len(sample) > 1:
                yield sample
            sample = {"__key__": key}
        sample[name[dot + 1:].lower()] = data
    if len(sample) > 1:
        yield sample
