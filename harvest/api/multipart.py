"""A streaming multipart/form-data parser (RFC 7578): bytes in, part events out, sans I/O.

FastAPI's own form parsing needs python-multipart and spools each file whole before the
route runs; an upload route that streams to a store needs the parts as they arrive. Feed
it the body's chunks; it returns `PartStart` (the part's name, filename), `PartData`
(some of its bytes) and `PartEnd` events, holding back at most one delimiter's length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 << 10
_PARAM = re.compile(r';\s*([\w*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data."""


@dataclass
class PartStart:
    name: str
    filename: str | None
    content_type: str | None


@dataclass
class PartData:
    data: bytes


@dataclass
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


def header_params(value: str) -> dict[str, str]:
    """`form-data; name="file"; filename="a.jsonl"` -> {"name": "file", "filename": "a.jsonl"}."""
    return {m[1].lower(): (m[2] if m[2] is not None else m[3]).replace('\\"', '"')
            for m in _PARAM.finditer(value)}  # fmt: skip


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data Content-Type; MultipartError if it has none."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise MultipartError("the body must be multipart/form-data")
    boundary = header_params(content_type).get("boundary")
    if not boundary or len(boundary) > 70:
        raise MultipartError("multipart/form-data needs a boundary of 1 to 70 characters")
    return boundary.encode("latin-1")


class MultipartParser:
    def __init__(self, boundary: bytes) -> None:
        self.delimiter = b"\r\n--" + boundary
        self.buffer = bytearray(b"\r\n")  # so that the first boundary reads like the others
        self.state = "preamble"  # -> after_delimiter -> headers -> body -> after_delimiter ... -> done

    @property
    def done(self) -> bool:
        return self.state == "done"

    def feed(self, data: bytes) -> list[Event]:
        self.buffer += data
        events: list[Event] = []
        while True:
            if self.state in ("preamble", "body"):
                at = self.buffer.find(self.delimiter)
                if at < 0:
                    keep = len(self.delimiter) - 1  # the delimiter may begin in these bytes
                    if self.state == "body" and len(self.buffer) > keep:
                        events.append(PartData(bytes(self.buffer[:-keep])))
                        del self.buffer[:-keep]
                    elif self.state == "preamble":
                        del self.buffer[:-keep]
                    return events
                if self.state == "body":
                    if at:
                        events.append(PartData(bytes(self.buffer[:at])))
                    events.append(PartEnd())
                del self.buffer[: at + len(self.delimiter)]
                self.state = "after_delimiter"
            elif self.state == "after_delimiter":
                end = self.buffer.find(b"\r\n")
                if self.buffer.startswith(b"--"):
                    self.state, self.buffer = "done", bytearray()
                    return events
                if end < 0:
                    if len(self.buffer) > 256:
                        raise MultipartError("malformed multipart boundary line")
                    return events
                if self.buffer[:end].strip(b" \t"):  # only transport padding may follow a boundary
                    raise MultipartError("malformed multipart boundary line")
                del self.buffer[: end + 2]
                self.state = "headers"
            elif self.state == "headers":
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_HEADER_BYTES:
                        raise MultipartError("multipart part headers too long")
                    return events
                events.append(self._part_start(bytes(self.buffer[:end])))
                del self.buffer[: end + 4]
                self.state = "body"
            else:  # done: an epilogue is ignored
                self.buffer.clear()
                return events

    def close(self) -> None:
        """At the end of the body: MultipartError unless the closing boundary came."""
        if not self.done:
            raise MultipartError("the multipart body ended before its closing boundary")

    @staticmethod
    def _part_start(raw: bytes) -> PartStart:
        headers: dict[str, str] = {}
        for line in raw.decode("utf-8", "replace").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        if not disposition.lower().startswith("form-data"):
            raise MultipartError("each multipart part needs Content-Disposition: form-data")
        params = header_params(disposition)
        if "name" not in params:
            raise MultipartError("a multipart part has no name")
        return PartStart(params["name"], params.get("filename"), headers.get("content-type"))
