"""Where a model or tokenizer comes from: a directory here, or a hub id, tried only when the hub can
answer. A typo'd local path (`models/does-not-exist`) looks like a hub id (`owner/name`); without
this check transformers retries the hub for most of a minute, then quotes an unrelated error."""

from __future__ import annotations

import difflib
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from phitune.errors import PhituneError

PROBE_SECONDS = 2.0
_reachable: dict[str, bool] = {}


def check_source(name: str, key: str = "model.name_or_path") -> None:
    """Return if `name` is a directory here, or a hub id that is cached or reachable; else raise
    a one-line error with the closest existing directory."""
    from phitune.config import looks_local

    path = Path(name).expanduser()
    if path.exists():
        return
    if not looks_local(name) and (_cached(name) or hub_reachable()):
        return
    why = (
        ""
        if looks_local(name)
        else f", and the hub ({_hub_host()}) is not reachable"
        + (" (HF_HUB_OFFLINE is set)" if _offline() else " from this machine")
    )
    close = closest_directory(path)
    raise PhituneError(
        f"{key}: {name!r} is not a directory here{why}: check the path" + (f"; did you mean {close}?" if close else "")
    )


def closest_directory(path: Path) -> str | None:
    """The existing directory whose name is nearest `path`'s, beside it (or beside its nearest
    existing parent)."""
    parent, wanted = path.parent, path.name
    while not parent.is_dir() and parent != parent.parent:
        wanted, parent = parent.name, parent.parent
    try:
        names = [p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return None
    close = difflib.get_close_matches(wanted, names, n=1, cutoff=0.6)
    return str(parent / close[0]) if close else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def hub_reachable() -> bool:
    """One TCP connection to the hub, at most PROBE_SECONDS (name lookup included), once per process."""
    if _offline():
        return False
    host = _hub_host()
    if host not in _reachable:
        result: list[bool] = []

        def probe() -> None:
            try:
                socket.create_connection((host, 443), timeout=PROBE_SECONDS).close()
                result.append(True)
            except OSError:
                result.append(False)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(PROBE_SECONDS)
        _reachable[host] = bool(result and result[0])
    return _reachable[host]


def _cached(repo_id: str) -> bool:
    """A snapshot of `repo_id` in the hub cache (its documented layout; importing huggingface_hub
    just to ask would cost a second)."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub")
    snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())
