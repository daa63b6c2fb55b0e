"""Who may do what in the web app: access tokens for two roles, checked in constant time, in expiring sessions.

On a loopback address the app has no login and everyone is an admin (today's single-user default). On any
other address `chattune web` writes the workspace's `.chattune-web/auth.json` (mode 0600) before it starts the
server: the SHA-256 of each role's token, a random key that signs sessions, and the session length. The tokens
themselves come from the environment, a file, or are generated and printed once; never from a command-line flag,
which any user of the machine can read in `ps`.

A signed-in session holds its role and expiry signed with the server's key, so nothing a client sends (widget
values, query parameters, a cookie) and nothing written into session state without the key can make a session an
admin. The browser keeps the signed session in a cookie (SameSite=Strict), so a reload or a page opened by its
address stays signed in until it expires; a new launch has a new key, which ends every earlier session.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from chattune.errors import ConfigError

Role = Literal["admin", "annotator"]
ROLES: tuple[Role, ...] = ("admin", "annotator")
# what each role may open; annotators label, edit, accept/reject and export, admins also train and chat
PAGES: dict[Role, tuple[str, ...]] = {
    "admin": ("labeling", "monitor", "playground"),
    "annotator": ("labeling",),
}
TOKEN_ENV = {"admin": "CHATTUNE_WEB_ADMIN_TOKEN", "annotator": "CHATTUNE_WEB_ANNOTATOR_TOKEN"}
AUTH_DIR = ".chattune-web"
AUTH_FILE = "auth.json"
SESSION_KEY = "chattune_session"  # no widget uses this key, so no client message can set it
COOKIE = "chattune_session"  # the same signed session in the browser, so that a reload stays signed in
FAILED_SIGN_IN_DELAY_S = 1.0  # slows guessing down; tokens carry 128 random bits anyway
MIN_TOKEN_CHARS = 12


def digest(token: str) -> str:
    """The SHA-256 of a token, hex: what the auth file keeps instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token (128 bits, URL-safe)."""
    return secrets.token_urlsafe(16)


def auth_path(workspace: Path) -> Path:
    """Where the launcher leaves the app's auth settings for a workspace."""
    return Path(workspace) / AUTH_DIR / AUTH_FILE


def read_tokens(token_file: Path | None, environ: dict[str, str] | None = None) -> dict[Role, str | None]:
    """Each role's token from `token_file` (JSON or `role: token` lines) or else the environment; None if unset."""
    env = os.environ if environ is None else environ
    tokens: dict[Role, str | None] = {role: env.get(TOKEN_ENV[role]) or None for role in ROLES}
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read the token file {token_file}: {e.strerror}") from None
        try:
            values = json.loads(text)
        except json.JSONDecodeError:  # `admin: TOKEN` lines (a YAML subset without needing YAML's types)
            values = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if not isinstance(values, dict) or not set(values) & set(ROLES):
            raise ConfigError(
                f"{token_file} holds no token: write one line per role, `admin: TOKEN` and `annotator: TOKEN`"
            )
        unknown = sorted(set(map(str.strip, values)) - set(ROLES))
        if unknown:
            raise ConfigError(f"{token_file}: unknown role(s) {unknown}; the roles are admin and annotator")
        for role in ROLES:
            value = next((v for k, v in values.items() if k.strip() == role), None)
            if value is not None:
                tokens[role] = str(value).strip() or None
    for role, token in tokens.items():
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"the {role} token is too short: use at least {MIN_TOKEN_CHARS} characters")
    if tokens["admin"] is not None and tokens["admin"] == tokens["annotator"]:
        raise ConfigError("the admin and annotator tokens are the same: give each role its own token")
    return tokens


def write_auth(workspace: Path, tokens: dict[Role, str], session_hours: float) -> Path:
    """Write the app's auth settings (token digests, a new signing key) readable by this user only."""
    path = auth_path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "digests": {role: digest(token) for role, token in tokens.items()},
        "key": secrets.token_hex(32),  # new each launch: sessions of an earlier server end with it
        "session_s": int(session_hours * 3600),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(settings, f)
    os.replace(tmp, path)
    return path


def remove_auth(workspace: Path) -> None:
    """Forget a previous launch's auth settings (a loopback launch has no login)."""
    auth_path(workspace).unlink(missing_ok=True)


@dataclass(frozen=True)
class Auth:
    """The auth settings a server runs with."""

    digests: dict[str, str]
    key: bytes
    session_s: int

    @classmethod
    def load(cls, workspace: Path) -> Auth | None:
        """The workspace's auth settings, or None when the launcher wrote none (a loopback launch)."""
        path = auth_path(workspace)
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(dict(data["digests"]), bytes.fromhex(data["key"]), int(data["session_s"]))

    def role_of(self, token: str) -> Role | None:
        """The role a token signs in as, compared in constant time against every role's digest."""
        given = digest(token.strip())
        found: Role | None = None
        for role in ROLES:
            expected = self.digests.get(role)
            # every digest is compared, whatever matched before: the time taken says nothing
            if expected is not None and hmac.compare_digest(given, expected):
                found = role
        return found

    def sign(self, role: Role, now: float | None = None) -> dict[str, Any]:
        """A session for `role`, expiring after the session length."""
        expires = int((time.time() if now is None else now) + self.session_s)
        return {"role": role, "expires": expires, "mac": self._mac(role, expires)}

    def verify(self, session: Any, now: float | None = None) -> Role | None:
        """The role of a session this server signed and that has not expired; None otherwise."""
        if not isinstance(session, dict):
            return None
        role, expires, mac = session.get("role"), session.get("expires"), session.get("mac")
        if role not in ROLES or not isinstance(expires, int) or not isinstance(mac, str):
            return None
        if not hmac.compare_digest(mac, self._mac(role, expires)):
            return None
        return role if (time.time() if now is None else now) < expires else None

    def to_cookie(self, session: dict[str, Any]) -> str:
        """A signed session as one cookie value (`role.expires.mac`), so a reload keeps the sign-in."""
        return f"{session['role']}.{session['expires']}.{session['mac']}"

    def from_cookie(self, value: str | None, now: float | None = None) -> dict[str, Any] | None:
        """The session a cookie carries, if this server signed it and it has not expired; else None."""
        if not isinstance(value, str):
            return None
        role, _, rest = value.partition(".")
        expires, _, mac = rest.partition(".")
        if not expires.isdigit():
            return None
        session = {"role": role, "expires": int(expires), "mac": mac}
        return session if self.verify(session, now) else None

    def _mac(self, role: str, expires: int) -> str:
        return hmac.new(self.key, f"{role}|{expires}".encode(), hashlib.sha256).hexdigest()
