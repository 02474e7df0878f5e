"""Who may connect, and as which tenant: a token names a tenant.

``--tokens FILE`` holds one ``tenant:token`` per line (``#`` comments and blank lines allowed); it is
read at start and again on SIGHUP. ``--token T`` is one tenant, ``default``; with neither, every
client is the ``default`` tenant (and the server listens on loopback only). Each tenant's programs
run in that tenant's own worker process: tenants share nothing but the read-only weights store.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from genie._errors import GenieError

DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class TokensError(GenieError):
    """The tokens file is unreadable or malformed (the operator's to fix): named in the message."""


@dataclass(frozen=True)
class Tenants:
    """Tokens by tenant; an empty table means no token is checked (everyone is ``default``)."""

    tokens: tuple[tuple[str, str], ...] = ()  # (tenant, token), in file order
    path: str | None = None

    @classmethod
    def single(cls, token: str | None) -> Tenants:
        return cls(((DEFAULT, token),)) if token else cls()

    @classmethod
    def load(cls, path: str) -> Tenants:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise TokensError(f"cannot read the tokens file {path!r}: {e}") from e
        rows: list[tuple[str, str]] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, token = line.partition(":")
            name, token = name.strip(), token.strip()
            if not sep or not _NAME.fullmatch(name) or not token:
                raise TokensError(f"{path}:{lineno}: expected 'tenant:token' with a tenant name of "
                                  "letters, digits, '_', '.' or '-' (at most 64) and a non-empty token")
            if any(token == t for _, t in rows):
                raise TokensError(f"{path}:{lineno}: this token is already given to another tenant")
            rows.append((name, token))
        if not rows:
            raise TokensError(f"the tokens file {path!r} names no tenant")
        return cls(tuple(rows), path)

    @property
    def checked(self) -> bool:
        return bool(self.tokens)

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.tokens)) if self.tokens else [DEFAULT]

    def tenant_of(self, token: str) -> str | None:
        """The tenant ``token`` names, or None. Every token is compared, in constant time each, so
        the answer's timing says nothing about which token came close."""
        if not self.tokens:
            return DEFAULT
        found = None
        given = token.encode()
        for name, t in self.tokens:
            if hmac.compare_digest(given, t.encode()) and found is None:
                found = name
        return found
