"""The view's token: a random secret in a 0600 file, asked of every request but GET /healthz.

Sent as `Authorization: Bearer <token>`, or once as `?token=<token>` by a browser (the answer then sets an
HttpOnly, SameSite=Strict cookie, so the address bar and the history keep no secret after the first visit).
"""
from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from edge_runtime.errors import ConfigError

COOKIE = "edge_view"
TOKEN_BYTES = 24  # 32 characters of URL-safe base64


def load_or_create_token(path: Path) -> str:
    """The token in `path`; a new one written 0600 (atomically) when the file does not exist."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        token = ""
    except OSError as exc:
        raise ConfigError(str(path), f"key 'view.token_file': cannot read the view token ({exc.strerror})") from None
    else:
        if not token:
            raise ConfigError(str(path), "key 'view.token_file': the view token file is empty; delete it to "
                                         "get a new token, or write one into it")
        if path.stat().st_mode & 0o077:
            raise ConfigError(str(path), "key 'view.token_file': the view token file is readable by others; "
                                         f"chmod 600 {path}")
        return token
    token = secrets.token_urlsafe(TOKEN_BYTES)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # a leftover from a crash may carry another mode: O_EXCL makes ours 0600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (token + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise ConfigError(str(path), f"key 'view.token_file': cannot write the view token "
                                     f"({exc.strerror or exc})") from None
    return token


def token_matches(expected: str, offered: str | None) -> bool:
    return bool(offered) and hmac.compare_digest(expected.encode("utf-8"), offered.encode("utf-8"))


def offered_token(headers, query, cookies) -> tuple[str | None, bool]:
    """(the token a request offers, whether it came in the query string: a browser's first visit)."""
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":  # the scheme is case-insensitive (RFC 7235)
        return value.strip(), False
    if query.get("token"):
        return query.get("token"), True
    return cookies.get(COOKIE), False
