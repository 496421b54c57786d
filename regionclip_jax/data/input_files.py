"""Reading users' input files so that every error names the file (and the line).

Used by the shard converters, the concept counter and the inference commands: a caption list that
is not UTF-8, an empty or invalid json, or a bad JSON Lines line fails with
`PATH:LINE: what is wrong`, never with a bare decoder message.
"""

from __future__ import annotations

import json
import os
from typing import Any


def decode_utf8(
    data: bytes, path: str | os.PathLike, what: str = "file", first_line: int = 1
) -> str:
    """`data` (the bytes of the file `path` from line `first_line` on) as text; a BOM is dropped.

    Raises:
      ValueError: not UTF-8, naming the file, the line and the column of the first bad byte.
    """
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + first_line
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(
            f"{os.fspath(path)}:{line}: {what} is not UTF-8 text (byte 0x{data[e.start]:02x} at "
            f"column {column}): save it as UTF-8"
        ) from None


def read_utf8(path: str | os.PathLike, what: str = "file") -> str:
    """The text of a UTF-8 file; a decode error names the file and line (`decode_utf8`)."""
    with open(path, "rb") as f:
        return decode_utf8(f.read(), path, what)


def load_json_file(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The parsed JSON of `path`; an empty or invalid file is a ValueError naming it (and the line).

    Raises:
      OSError: the file cannot be read (the error names it).
      ValueError: not UTF-8, empty, or not valid JSON.
    """
    text = read_utf8(path, what)
    if not text.strip():
        raise ValueError(
            f"{os.fspath(path)}: empty file ({os.path.getsize(path)} bytes), expected a {what}"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{os.fspath(path)}:{e.lineno}: not valid JSON ({e.msg}, line {e.lineno} column "
            f"{e.colno}), expected a {what}"
        ) from None


def json_line(line: str, path: str | os.PathLike, lineno: int) -> Any:
    """One line of a JSON Lines file; an invalid line is a ValueError naming the file and line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{os.fspath(path)}:{lineno}: not valid JSON ({e.msg}, column {e.colno})"
        ) from None
