"""The members of a tar file from its headers alone: (name, data offset, data size), seeking over the data.

A fast reader of the formats tar writers produce (POSIX ustar with its name prefix, GNU long names, PAX
`path` and `size` records), for indexing WebDataset shards: about ten times faster than iterating
`tarfile.TarFile`, and explicit about damage. Every header's checksum is verified; a header that fails it,
or a member whose data runs past the end of the file, raises `TarDamaged` after the members before it were
yielded (the caller keeps those).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Iterator

BLOCK = 512


class TarDamaged(ValueError):
    """The headers break off: a bad checksum, or the file ends inside a member."""


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # of the data, in bytes from the start of the file
    size: int


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip()
    if not stored:
        return False
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])  # the checksum field counts as spaces
    try:
        return int(stored, 8) == computed
    except ValueError:  # not octal digits: not a header
        return False


def _pax(data: bytes) -> dict[str, str]:
    records, position = {}, 0
    while position < len(data):
        length_text, _, rest = data[position:].partition(b" ")
        if not length_text.isdigit():
            break
        length = int(length_text)
        key, _, value = data[position + len(length_text) + 1: position + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        position += length
    return records


def members(handle: BinaryIO, file_size: int) -> Iterator[Member]:
    """Regular-file members of the tar in `handle` (seekable) in file order. Raises `TarDamaged` where the
    headers break off, and ValueError when the first header is not a tar header at all."""
    position, long_name, pax = 0, None, {}
    while position + BLOCK <= file_size:
        handle.seek(position)
        header = handle.read(BLOCK)
        if len(header) < BLOCK or not header.strip(b"\0"):  # end-of-archive blocks (or padding)
            return
        if not _checksum_ok(header):
            if position == 0:
                raise ValueError("not a tar file (the first header's checksum does not match)")
            raise TarDamaged(f"a damaged tar header at byte {position}")
        kind = header[156:157]
        size = _number(header[124:136])
        data = position + BLOCK
        if kind in (b"x", b"L"):  # extended header / GNU long name for the next member
            handle.seek(data)
            payload = handle.read(size)
            if kind == b"L":
                long_name = payload.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                pax = _pax(payload)
        elif kind in (b"0", b"\0", b"7"):  # a regular file
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if header[257:262] == b"ustar" else ""
            name = pax.get("path") or long_name or (f"{prefix}/{name}" if prefix else name)
            size = int(pax["size"]) if "size" in pax else size
            if data + size > file_size:
                raise TarDamaged(f"the file ends inside member {name!r} ({file_size - data} of {size} bytes)")
            yield Member(name, data, size)
            long_name, pax = None, {}
        else:  # directories, links, global headers: no data of ours
            long_name, pax = (long_name, pax) if kind == b"g" else (None, {})
        position = data + (size + BLOCK - 1) // BLOCK * BLOCK
