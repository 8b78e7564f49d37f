"""Registering base models: the identity and linear modules uploads are checked against."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coordinator.base_models.models import BaseModelRecord
from coordinator.core.db import begin_write
from protocol import BaseModelSpec


class BaseModelConflict(ValueError):
    """The name or the fingerprint is already registered for a different model."""


def register_base_model(session: Session, spec: BaseModelSpec) -> BaseModelRecord:
    """Record `spec`; registering the same spec again returns the existing row."""
    begin_write(session)
    by_name = get_by_name(session, spec.name)
    by_fingerprint = get_by_fingerprint(session, spec.fingerprint)
    existing = by_name or by_fingerprint
    if existing is not None:
        if existing.to_spec() == spec:
            session.commit()
            return existing
        other = "name" if by_name is not None else "fingerprint"
        session.rollback()
        raise BaseModelConflict(
            f"a different base model is already registered with this {other}: "
            f"{existing.name} (revision {existing.revision}, {existing.fingerprint})"
        )
    record = BaseModelRecord(
        name=spec.name,
        revision=spec.revision,
        fingerprint=spec.fingerprint,
        architecture=spec.architecture,
        spec=spec.model_dump(mode="json"),
    )
    session.add(record)
    try:
        session.commit()
    except IntegrityError as error:  # registered concurrently
        session.rollback()
        raise BaseModelConflict(f"base model {spec.name} was registered concurrently") from error
    return record


def register_base_model_from_path(
    session: Session, name_or_path: str, *, name: str | None = None, revision: str | None = None
) -> BaseModelRecord:
    """Load the model through `phatgoose.models` and register its spec (slow: loads weights)."""
    from phatgoose.models import base_model_spec, load_base_model

    model, _tokenizer = load_base_model(name_or_path)
    spec = base_model_spec(model, name or name_or_path, revision=revision)
    return register_base_model(session, spec)


def get_by_name(session: Session, name: str) -> BaseModelRecord | None:
    return session.scalar(select(BaseModelRecord).where(BaseModelRecord.name == name))


def get_by_fingerprint(session: Session, fingerprint: str) -> BaseModelRecord | None:
    return session.scalar(select(BaseModelRecord).where(BaseModelRecord.fingerprint == fingerprint))


def list_base_models(
    session: Session, *, limit: int | None = None, offset: int = 0
) -> list[BaseModelRecord]:
    """Base models by name; `limit=None`: all of them."""
    query = select(BaseModelRecord).order_by(BaseModelRecord.name).offset(offset)
    return list(session.scalars(query if limit is None else query.limit(limit)))


def count_base_models(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(BaseModelRecord)) or 0
