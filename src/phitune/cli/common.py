"""What the command modules share: the usage exit code, the logger, KEY=VALUE flags."""

from __future__ import annotations

import logging

from phitune.errors import PhituneError

EXIT_USAGE = 2
log = logging.getLogger("phitune")


def key_values(flag: str, items: list[str], form: str) -> list[tuple[str, str]]:
    """NAME=VALUE flag values as pairs; one with an empty side is refused, naming the form."""
    pairs = [item.partition("=") for item in items]
    bad = [item for item, (key, eq, value) in zip(items, pairs) if not (key and eq and value)]
    if bad:
        raise PhituneError(f"{flag} {bad[0]}: give {form}")
    return [(key, value) for key, _, value in pairs]
