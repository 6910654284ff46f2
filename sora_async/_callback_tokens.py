"""Per-create callback tokens: who may claim that a task ended.

The provider signs nothing, so the callback URL itself is the credential. Each create
gets its own token, ``<nonce>.<mac>``, where the mac is an HMAC of the nonce under
the client's callback secret. The receiver checks the mac (junk is refused without a
lookup) and the scheduler checks that the nonce is the one sent with that very
task's create. The secret never appears in a URL, and someone who learns it, or one
task's URL, still cannot claim the end of another task: each forged claim is refused
for free instead of costing a confirming status request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["LEGACY", "callback_url_with_token", "new_token", "nonce_in", "verify"]

#: What ``verify`` returns for a token that is the bare secret: the form of callback
#: URLs made before per-create tokens (still honoured for tasks made then), bound to
#: no task.
LEGACY: Final = ""

_NONCE_BYTES = 12


def _mac(secret: str, nonce: str) -> str:
    return hmac.new(secret.encode(), nonce.encode(), hashlib.sha256).hexdigest()[:32]


def new_token(secret: str) -> str:
    """Return a fresh token for one create's callback URL."""
    nonce = secrets.token_urlsafe(_NONCE_BYTES)
    return f"{nonce}.{_mac(secret, nonce)}"


def verify(secret: str, token: str | None) -> str | None:
    """Return the nonce of a genuine token, LEGACY for the bare secret, None otherwise.

    Constant time in the token's content, so its mac cannot be guessed byte by byte.
    """
    if token is None:
        return None
    nonce, dot, mac = token.partition(".")
    if not dot:
        return LEGACY if hmac.compare_digest(token.encode(), secret.encode()) else None
    if hmac.compare_digest(mac.encode(), _mac(secret, nonce).encode()):
        return nonce
    return None


def callback_url_with_token(url: str, token: str) -> str:
    """Return ``url`` with ``token=...`` added to its query."""
    parts = urlsplit(url)
    query = urlencode([*parse_qsl(parts.query), ("token", token)])
    return urlunsplit(parts._replace(query=query))


def nonce_in(url: str | None) -> str | None:
    """Return the nonce of the per-create token in a callback URL (None: it has none)."""
    if url is None:
        return None
    for name, value in parse_qsl(urlsplit(url).query):
        if name == "token" and "." in value:
            return value.partition(".")[0]
    return None
