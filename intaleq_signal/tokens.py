"""Participant tokens: a per-session, per-role secret that proves an app is
the driver or the passenger the backend created the session for
(docs/protocol.md, "Participant tokens").

A token is ``base64url(HMAC-SHA256(K, session_id NUL role))`` without
padding: 256 bits in 43 ASCII characters. ``K`` is derived from ``API_KEY``
(``HMAC-SHA256(API_KEY, "intaleq-signal participant tokens v1")``), so a
re-POST, a restart and every other instance with the same ``API_KEY`` give
and check the same tokens without storing any, and a token never reveals
the API key. Checks compare in constant time (``hmac.compare_digest``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

__all__ = ["ROLES", "TokenMinter"]

ROLES = ("driver", "passenger")
_CONTEXT = b"intaleq-signal participant tokens v1"


class TokenMinter:
    """Mints and checks the tokens of one ``API_KEY``.

    Args:
        api_key: the daemon's ``API_KEY`` (any length; the configuration
            asks for at least 32 characters).
    """

    __slots__ = ("_key",)

    def __init__(self, api_key: str) -> None:
        self._key = hmac.new(api_key.encode("utf-8", "surrogatepass"), _CONTEXT, hashlib.sha256).digest()

    def token(self, session_id: str, role: str) -> str:
        """The token of ``role`` (``driver`` or ``passenger``) in the
        session ``session_id``: 43 characters of ``[A-Za-z0-9_-]``.

        Raises:
            ValueError: ``role`` is not a participant role.
        """
        if role not in ROLES:
            raise ValueError(f"not a participant role: {role!r}")
        message = session_id.encode("utf-8", "surrogatepass") + b"\0" + role.encode()
        digest = hmac.digest(self._key, message, hashlib.sha256)
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def check(self, session_id: str, role: str, token: str) -> bool:
        """Whether ``token`` is the token of ``role`` in ``session_id``,
        compared in constant time (for tokens of ASCII characters; anything
        else is no token of ours)."""
        if not token.isascii():
            return False
        return hmac.compare_digest(self.token(session_id, role).encode(), token.encode())
