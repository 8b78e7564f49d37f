"""Who am I: the identity behind a bearer token (tokens are made with the CLI)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel

from coordinator.core.deps import IdentityDep

router = APIRouter(prefix="/auth", tags=["auth"])


class Identity(BaseModel):
    name: str
    role: str
    token_id: str
    created_at: datetime


@router.get("/me", summary="The token's name (namespace, or a worker's label) and role")
def me(token: IdentityDep) -> Identity:
    return Identity(
        name=token.name, role=token.role, token_id=token.public_id, created_at=token.created_at
    )
