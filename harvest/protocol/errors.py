"""InvalidRequest: a request body that is refused, with the field to blame.

Both ways in raise it: the HTTP layer answers it as an OpenAI 400 (`param` = the field),
the offline readers record it as that line's or row's error. Pydantic errors are worded
here, once, so a bad field reads the same online and offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def param_name(loc: Sequence[str | int]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    param = ""
    for part in loc:
        if part == "body":
            continue
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


def from_pydantic(error: dict[str, Any]) -> InvalidRequest:
    """One pydantic error (`ValidationError.errors()[0]`) as OpenAI words a bad parameter."""
    param = param_name(tuple(error.get("loc", ())))
    if error.get("type") == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param)
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return InvalidRequest(f"Invalid value for '{param}': {message}", param)
