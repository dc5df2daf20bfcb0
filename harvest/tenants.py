"""Tenants: who an API key speaks for. Parsed where the config is read, used where the app
checks keys (harvest/api/auth.py); plain functions, so neither side imports the other.

A tenant is named by the name given with its key (`NAME:KEY`), else by a short hash of the
key: the key itself is never stored, logged or shown. Without keys there is one tenant, `""`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

DEFAULT_TENANT = ""


def tenant_name(key: str) -> str:
    """The name of a key given without one: stable, short, and no use for recovering the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def parse_keys(entries: Iterable[str], source: str = "api key") -> dict[str, str]:
    """`key` or `name:key` entries (blank ones and `#` comments skipped) -> {key: tenant name}.
    ValueError names the entry's position, never its text (it may hold a key)."""
    keys: dict[str, str] = {}
    for number, entry in enumerate(entries, 1):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, key = entry.partition(":")
        if not sep:
            name, key = tenant_name(entry), entry
        name, key = name.strip(), key.strip()
        if not name or not key or any(c.isspace() for c in key):
            raise ValueError(f"{source} {number}: must be KEY or NAME:KEY, with no spaces in the key")
        if key in keys:
            raise ValueError(f"{source} {number}: this key is given twice")
        keys[key] = name
    return keys
