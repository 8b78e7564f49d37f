"""What a failed evaluation job may say in public (its API body and the release page).

A worker's exceptions carry its file paths, user name and host name (a traceback, a
`FileNotFoundError` of a tasks directory, a database URL). The job row keeps only a public
text: the error's kind and, for errors raised on purpose with a message meant for people
(`PublicJobError`), that message; the full traceback goes to the worker's log. Whatever
is shown is redacted once more (`redact`), which also covers rows stored before this rule.
"""

from __future__ import annotations

import re
import socket
from functools import cache

MAX_PUBLIC_ERROR = 2_000

# Ordered: URLs before paths (a URL holds a path), paths before addresses.
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\[^\s'\"<>]*")
# An absolute or home path: `/x...`, `~/x`, `~user/x`, not the `/` inside `parent/subtask`.
_POSIX_PATH = re.compile(r"(?<![\w.~/-])(?:~[\w.-]*)?/[^\s'\"<>,;()\[\]{}]+")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")


class PublicJobError(Exception):
    """An evaluation failure whose message is written for the job's public page: built only
    from what the requester sent (task names) and counts, never from paths or hosts."""


@cache
def _host_names() -> tuple[str, ...]:
    names = {socket.gethostname(), socket.getfqdn()}
    names |= {name.split(".", 1)[0] for name in names}
    # Longest first, so that `host.example.org` is not left as `<host>.example.org`.
    return tuple(sorted((n for n in names if n and n != "localhost"), key=len, reverse=True))


def redact(text: str) -> str:
    """`text` without URLs, absolute and home paths, IPv4 addresses or this host's name."""
    text = _URL.sub("<url>", text)
    text = _WINDOWS_PATH.sub("<path>", text)
    text = _POSIX_PATH.sub("<path>", text)
    text = _IPV4.sub("<address>", text)
    for name in _host_names():
        # Whole names only: a host called `w1` must not eat the `w1` of `w12`.
        pattern = rf"(?<![\w-]){re.escape(name)}(?![\w-])"
        text = re.sub(pattern, "<host>", text, flags=re.IGNORECASE)
    if len(text) > MAX_PUBLIC_ERROR:
        text = text[:MAX_PUBLIC_ERROR] + "..."
    return text


def public_error(error: BaseException) -> str:
    """The text a failed attempt stores: `<kind>: <message>` for a `PublicJobError`, else
    only the kind (the message and traceback stay in the worker's log)."""
    kind = type(error).__name__
    if isinstance(error, PublicJobError):
        return redact(f"{kind}: {error}")
    return f"{kind}: the worker failed on this job (the details are in the worker's log)"
