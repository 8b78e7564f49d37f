"""Building Flower messages and contexts outside a Flower runtime, for tests."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 7


def train_message(config: Mapping[str, Any], node_id: int, message_id: str = "m1") -> Message:
    """A train message as a SuperNode receives it."""
    metadata = Metadata(
        run_id=RUN_ID,
        message_id=message_id,
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600,
        message_type=MessageType.TRAIN,
    )
    return Message(content=RecordDict({"config": ConfigRecord(dict(config))}), metadata=metadata)


def node_context(
    node_id: int, node_config: Mapping[str, Any], run_config: Mapping[str, Any]
) -> Context:
    return Context(
        run_id=RUN_ID,
        node_id=node_id,
        node_config=dict(node_config),
        state=RecordDict(),
        run_config=dict(run_config),
    )


@contextmanager
def serverapp_identity() -> Iterator[None]:
    """What a ServerApp process has set before `main` runs (the identity new messages carry)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, 0
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def record_bytes(content: RecordDict) -> bytes:
    """Every key and value a message's content carries, as bytes (for scanning)."""
    chunks: list[bytes] = []
    for record_name, record in content.items():
        chunks.append(record_name.encode())
        for key, value in record.items():
            chunks.append(key.encode())
            if hasattr(value, "data"):  # an Array
                chunks += [value.data, value.dtype.encode(), value.stype.encode()]
            else:
                chunks.append(repr(value).encode())
                if isinstance(value, str):
                    chunks.append(value.encode())
    return b"\n".join(chunks)
