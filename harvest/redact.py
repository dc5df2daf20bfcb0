"""Secrets out of what we print: every Redis URL shown to a person or a log goes through here.

A Redis URL may carry a username and password in its userinfo (`redis://user:pw@host`)
or, as redis-py also accepts, in its query (`?password=pw`). Both are masked; host, port,
database and the other options stay, because they are what a person needs to see to tell
which Redis is meant.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
SECRET_QUERY_KEYS = {"password", "username"}
_USERINFO = re.compile(r"//[^/@]*@")  # the fallback for a URL urlsplit cannot take apart


def redact_url(url: str) -> str:
    """`redis://user:pw@host:6379/0` -> `redis://***:***@host:6379/0` (no secret: unchanged)."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        if "@" in parts.netloc:
            user, has_password, _ = parts.netloc.rpartition("@")[0].partition(":")
            userinfo = (MASK if user else "") + (f":{MASK}" if has_password else "")
            host = f"{userinfo}@{host}"
        query = parse_qsl(parts.query, keep_blank_values=True)
        if any(key in SECRET_QUERY_KEYS for key, _ in query):
            masked = [(key, MASK if key in SECRET_QUERY_KEYS else value) for key, value in query]
            return urlunsplit(parts._replace(netloc=host, query=urlencode(masked, safe="*")))
        return urlunsplit(parts._replace(netloc=host))
    except ValueError:  # e.g. a bad port or bracket: mask whatever sits before an @
        return _USERINFO.sub(f"//{MASK}@", url)
