"""Creating and checking bearer tokens.

A token reads `<prefix>_<public id>_<secret>`. The public id finds the row; the secret is
stored only as its sha256 and compared in constant time. Secrets are 256 random bits, so a
plain sha256 (no slow password hash) is enough.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from coordinator.auth.models import Role, Token
from coordinator.core.db import begin_write, utcnow

# A token's name is the namespace its holder publishes under (protocol's slug pattern); a
# worker token's name follows the same pattern but is only a label.
TOKEN_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_PUBLIC_ID_HEX = 16
_TOKEN = re.compile(
    r"^(?P<prefix>[a-z]{1,8})_(?P<public_id>[0-9a-f]{16})_(?P<secret>[\w-]{20,200})$"
)


@dataclass(frozen=True)
class IssuedToken:
    """A new token: `secret_token` is shown once and never stored."""

    token: Token
    secret_token: str


class InvalidTokenName(ValueError):
    pass


class NamespaceTaken(ValueError):
    """A contributor token for a namespace that already has an owner."""


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(
    session: Session,
    *,
    name: str,
    role: Role,
    prefix: str = "phg",
    same_owner: bool = False,
) -> IssuedToken:
    """A new token for `name`. A contributor token's name is the namespace it owns, so a
    name that already has an owner (a token of that name, revoked ones included, or experts
    in that namespace) is refused unless the operator says it is the same holder
    (`same_owner`, e.g. rotating a token): otherwise a second holder would take over the
    first one's namespace, its yanks and its uploads. A worker token's name is only a label
    (several may share one); it owns no namespace and claims none."""
    if not TOKEN_NAME_PATTERN.match(name):
        raise InvalidTokenName(
            f"token name {name!r} must be a namespace: lower-case letters, digits and '_.-', "
            "starting with a letter or digit, at most 63 characters"
        )
    public_id = secrets.token_hex(_PUBLIC_ID_HEX // 2)
    secret = secrets.token_urlsafe(32)
    begin_write(session)
    if Role(role) == Role.CONTRIBUTOR and not same_owner:
        owner = _namespace_owner(session, name)
        if owner is not None:
            session.rollback()
            raise NamespaceTaken(
                f"namespace {name!r} {owner}; a contributor token for it would own it too. "
                "Pass --same-owner (same_owner=True) if the new token is for the same holder "
                "(e.g. rotating a token), else choose another name"
            )
    token = Token(
        public_id=public_id, name=name, role=Role(role).value, secret_sha256=_sha256(secret)
    )
    session.add(token)
    session.commit()
    return IssuedToken(token=token, secret_token=f"{prefix}_{public_id}_{secret}")


def _namespace_owner(session: Session, name: str) -> str | None:
    """How `name` is already owned, in words, or None when it is free. Worker tokens own no
    namespace: a worker labelled `gpu-1` leaves the namespace `gpu-1` free."""
    holder = session.scalar(
        select(Token)
        .where(Token.name == name, Token.role != Role.WORKER)
        .order_by(Token.id)
        .limit(1)
    )
    if holder is not None:
        return f"is owned by token {holder.public_id} ({holder.role})"
    # The experts table is the experts domain's; a plain query keeps auth free of it.
    if session.execute(
        text("SELECT 1 FROM experts WHERE namespace = :name LIMIT 1"), {"name": name}
    ).first():
        return "has experts"
    return None


def authenticate(session: Session, presented: str) -> Token | None:
    """The live token `presented` stands for, or None (unknown, malformed, wrong, revoked)."""
    match = _TOKEN.match(presented.strip())
    if match is None:
        return None
    token = session.scalar(select(Token).where(Token.public_id == match["public_id"]))
    # Hash even when the id is unknown, so timing says nothing about which ids exist.
    presented_hash = _sha256(match["secret"])
    stored_hash = token.secret_sha256 if token is not None else "0" * 64
    if not hmac.compare_digest(presented_hash, stored_hash) or token is None:
        return None
    return None if token.revoked_at is not None else token


def list_tokens(session: Session) -> list[Token]:
    return list(session.scalars(select(Token).order_by(Token.id)))


def revoke_token(session: Session, public_id: str) -> Token | None:
    begin_write(session)
    token = session.scalar(select(Token).where(Token.public_id == public_id))
    if token is not None and token.revoked_at is None:
        token.revoked_at = utcnow()
    session.commit()
    return token
