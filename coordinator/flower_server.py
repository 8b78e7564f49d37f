"""The Flower ServerApp: one round in which every connected SuperNode trains an expert on its
private data, and every reply is catalogued as a new expert version.

Experts are catalogued, not averaged: each reply goes through the coordinator's one
registration path (`coordinator.experts.service.register_expert_package`, channel "flower"),
exactly like an HTTP upload. A node that fails or times out registers nothing and does not
stop the round.

Every node publishes as itself: the node id Flower stamps on its reply
(`message.metadata.src_node_id`, set by the SuperLink, not by the node) picks the namespace
`<namespace>-<node id>` and that namespace's contributor token, so one node can neither
publish into another node's namespace nor add versions to another node's expert, and the
version's uploader names the node (docs/security.md, "What a SuperNode may do").

The wire format of a reply is described in docs/federation.md; this module re-creates the
package files from it bit-exactly (and checks so against the sender's sha256 of every file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save as save_safetensors
from sqlalchemy.orm import Session

from coordinator.auth import service as auth
from coordinator.auth.models import Role, Token
from coordinator.core.app import open_database
from coordinator.core.config import Settings
from coordinator.core.errors import CoordinatorError
from coordinator.experts.files import open_file, stored_files, stored_segments
from coordinator.experts.models import Channel, ExpertVersion
from coordinator.experts.service import list_versions, register_expert_package
from coordinator.storage import BlobNotFound, BlobStore, open_blob_store
from protocol.flower import (
    FILES_KEY,
    JSON_FILES,
    KNOWN_KEY,
    KNOWN_RECORD,
    MAX_KNOWN_TENSORS,
    METADATA_SUFFIX,
    PACKAGE_RECORD,
    RAW_STYPE,
    SAFETENSORS_FILES,
    SHA256_SUFFIX,
    STORED_SUFFIX,
    TRAIN_CONFIG_RECORD,
    RoundSettings,
    TrainingRequest,
    split_run_config,
)
from protocol.validation import PackageRejected

log = logging.getLogger(__name__)

# Versions of a node's namespace looked at for the tensors it may leave out of its reply.
MAX_KNOWN_EXPERTS = 500


class PackageMessageError(ValueError):
    """A reply whose content is not an expert package in the wire format."""


# ------------------------------------------------------------------------ wire format
# The bytes of a stored tensor by their sha256, or None when the coordinator has none.
StoredTensors = Callable[[str], bytes | None]


def _nothing_stored(_sha256: str) -> bytes | None:
    return None


def write_package_from_content(
    content: RecordDict, directory: str | Path, stored: StoredTensors = _nothing_stored
) -> dict[str, Path]:
    """Re-create the package files carried by a reply in `directory`; returns name -> path.
    Tensors the reply names by digest instead of sending (protocol.flower, deltas) are read
    through `stored`.

    Raises `PackageMessageError` when the content is malformed, names a tensor the store
    does not have, or a re-created file's sha256 differs from the one the sender computed
    over its own file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if PACKAGE_RECORD not in content.config_records:
        raise PackageMessageError(f"the reply has no ConfigRecord {PACKAGE_RECORD!r}")
    package = content.config_records[PACKAGE_RECORD]
    files = package.get(FILES_KEY)
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise PackageMessageError(f"{PACKAGE_RECORD}[{FILES_KEY!r}] must list the file names")
    written: dict[str, Path] = {}
    for name in cast(list[str], files):  # every item checked above
        if name in JSON_FILES:
            text = package.get(name)
            if not isinstance(text, str):
                raise PackageMessageError(f"{name}: expected its text in {PACKAGE_RECORD}")
            data = text.encode("utf-8")
        elif name in SAFETENSORS_FILES:
            data = _safetensors_bytes(name, content, package, stored)
        else:
            raise PackageMessageError(f"{name}: not a file of an expert package")
        expected = package.get(name + SHA256_SUFFIX)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise PackageMessageError(
                f"{name}: re-created file has sha256 {actual}, the sender's file {expected!s}"
            )
        path = directory / name
        path.write_bytes(data)
        written[name] = path
    return written


# The safetensors dtypes an expert package may hold, as torch dtypes.
_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_bytes(
    name: str, content: RecordDict, package: ConfigRecord, stored: StoredTensors
) -> bytes:
    if name not in content.array_records:
        raise PackageMessageError(f"{name}: no ArrayRecord of that name in the reply")
    tensors: dict[str, torch.Tensor] = {}
    for key, array in content.array_records[name].items():
        if array.stype != RAW_STYPE or array.dtype not in _TORCH_DTYPES:
            raise PackageMessageError(
                f"{name}: tensor {key!r} is {array.stype!r} {array.dtype!r}; expected "
                f"{RAW_STYPE!r} with one of {sorted(_TORCH_DTYPES)}"
            )
        tensors[key] = _tensor(name, key, array.dtype, array.shape, array.data)
    for key, (dtype, shape, data) in _stored_tensors(name, package, stored).items():
        if key in tensors:
            raise PackageMessageError(f"{name}: tensor {key!r} is both sent and named as stored")
        tensors[key] = _tensor(name, key, dtype, shape, data)
    raw_metadata = package.get(name + METADATA_SUFFIX, "")
    if not isinstance(raw_metadata, str):
        raise PackageMessageError(f"{name}: its metadata must be JSON text in {PACKAGE_RECORD}")
    try:
        metadata = json.loads(raw_metadata) if raw_metadata else None
        # The same serializer the sender's file was written with, hence the same bytes.
        return save_safetensors(tensors, metadata=metadata)
    except (ValueError, TypeError) as error:
        raise PackageMessageError(f"{name}: cannot be re-created ({error})") from None


def _stored_tensors(
    name: str, package: ConfigRecord, stored: StoredTensors
) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """The tensors of `name` the reply names by digest: dtype, shape and the stored bytes."""
    raw = package.get(name + STORED_SUFFIX, "")
    if raw == "":
        return {}
    try:
        entries = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        entries = None
    if not isinstance(entries, dict):
        raise PackageMessageError(
            f"{name}: {name + STORED_SUFFIX} must be JSON: tensor -> sha256, dtype, shape"
        )
    found = {}
    for key, entry in entries.items():
        sha256 = entry.get("sha256") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (
            not isinstance(sha256, str)
            or dtype not in _TORCH_DTYPES
            or not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise PackageMessageError(
                f"{name}: stored tensor {key!r} needs a sha256, one of {sorted(_TORCH_DTYPES)} "
                "and a shape of non-negative integers"
            )
        data = stored(sha256)
        if data is None or hashlib.sha256(data).hexdigest() != sha256:
            raise PackageMessageError(
                f"{name}: tensor {key!r} is named by sha256 {sha256}, which this coordinator "
                "does not store; send its bytes"
            )
        found[key] = (cast(str, dtype), tuple(shape), data)
    return found


def _tensor(name: str, key: str, dtype: str, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    torch_dtype = _TORCH_DTYPES[dtype]
    expected = math.prod(shape) * torch.empty((), dtype=torch_dtype).element_size()
    if len(data) != expected:
        raise PackageMessageError(
            f"{name}: tensor {key!r} has {len(data)} bytes; {dtype} {list(shape)} needs {expected}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(shape)


# ------------------------------------------------------------------------- the round
@dataclass(frozen=True)
class NodeOutcome:
    node_id: int
    status: str  # "registered", "rejected", "failed" or "timed out"
    detail: str = ""
    expert: str | None = None  # `namespace/name@version` when registered


@dataclass
class RoundReport:
    outcomes: list[NodeOutcome] = field(default_factory=list)

    def by_status(self, status: str) -> list[NodeOutcome]:
        return [o for o in self.outcomes if o.status == status]

    def summary(self) -> str:
        lines = [
            f"Flower round: {len(self.by_status('registered'))} registered, "
            f"{len(self.by_status('rejected'))} rejected, {len(self.by_status('failed'))} failed, "
            f"{len(self.by_status('timed out'))} timed out"
        ]
        for o in self.outcomes:
            what = o.expert or o.detail
            lines.append(f"  node {o.node_id}: {o.status}" + (f": {what}" if what else ""))
        return "\n".join(lines)


# Registers the package files of one node's reply; returns the new version's
# `namespace/name@version`. Raises `Rejected` when the coordinator refuses it.
Registrar = Callable[[int, Mapping[str, Path]], str]


class Rejected(Exception):
    """The coordinator refused a package; `detail` says which file, check and tensor."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def wait_for_nodes(grid: Grid, min_nodes: int, wait_seconds: float) -> list[int]:
    """The connected node ids, once at least `min_nodes` are there or the wait is over."""
    deadline = time.monotonic() + wait_seconds
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes or time.monotonic() >= deadline:
            return nodes
        time.sleep(1.0)


# The digests of tensors the coordinator stores for a node (its namespace's experts).
KnownTensors = Callable[[int], list[str]]


def train_messages(
    nodes: Iterable[int], request: TrainingRequest, known: KnownTensors | None = None
) -> list[Message]:
    config = ConfigRecord({**request.to_config()})  # a dict of ConfigRecord's own value type
    messages = []
    for node in nodes:
        records = RecordDict({TRAIN_CONFIG_RECORD: config})
        digests = known(node)[:MAX_KNOWN_TENSORS] if known is not None else []
        if digests:
            records[KNOWN_RECORD] = ConfigRecord({KNOWN_KEY: digests})
        messages.append(Message(records, dst_node_id=node, message_type=MessageType.TRAIN))
    return messages


def run_round(
    grid: Grid,
    request: TrainingRequest,
    register: Registrar,
    *,
    min_nodes: int = 1,
    node_wait_seconds: float = 60.0,
    timeout_seconds: float | None = None,
    known: KnownTensors | None = None,
    stored: StoredTensors = _nothing_stored,
) -> RoundReport:
    """Ask every connected node to train an expert; register each reply as it comes back.
    With `known` and `stored`, nodes leave out the tensors the coordinator stores already
    (the train message lists them) and the replies are rebuilt from the store."""
    nodes = wait_for_nodes(grid, min_nodes, node_wait_seconds)
    report = RoundReport()
    if not nodes:
        log.warning("no SuperNode connected within %.0f s: nothing to train", node_wait_seconds)
        return report
    print(f"asking {len(nodes)} node(s) to train an expert: {nodes}", flush=True)
    messages = train_messages(nodes, request, known)
    replies = grid.send_and_receive(messages, timeout=timeout_seconds)
    answered: set[int] = set()
    for reply in replies:
        # The SuperLink stamps the sender's id; a node has one reply per round, and only
        # nodes that were asked may answer.
        node = reply.metadata.src_node_id
        if node not in nodes:
            why = "a reply from a node that was not asked to train: ignored"
            report.outcomes.append(NodeOutcome(node, "rejected", why))
            continue
        if node in answered:
            why = "a second reply from this node in the round: ignored"
            report.outcomes.append(NodeOutcome(node, "rejected", why))
            continue
        answered.add(node)
        report.outcomes.append(_register_reply(node, reply, register, stored))
    for node in nodes:
        if node not in answered:
            report.outcomes.append(
                NodeOutcome(node, "timed out", f"no reply within {timeout_seconds} s")
            )
    return report


def _register_reply(
    node: int, reply: Message, register: Registrar, stored: StoredTensors
) -> NodeOutcome:
    if reply.has_error():
        return NodeOutcome(node, "failed", _printable(reply.error.reason or ""))
    try:
        with tempfile.TemporaryDirectory(prefix="phatgoose-flower-") as tmp:
            files = write_package_from_content(reply.content, tmp, stored)
            ref = register(node, files)
    except PackageMessageError as error:
        return NodeOutcome(node, "rejected", f"malformed reply: {error}")
    except Rejected as error:
        return NodeOutcome(node, "rejected", error.detail)
    return NodeOutcome(node, "registered", expert=ref)


def _printable(text: str, limit: int = 500) -> str:
    """A node's own text for the round's log: control characters escaped (no forged
    lines), cut to `limit` characters."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return shown + ("..." if len(text) > limit else "")


# ------------------------------------------------------------- the coordinator side
def coordinator_settings(round_settings: RoundSettings) -> Settings:
    """The coordinator's settings (`PHATGOOSE_*`), with the run config's overrides."""
    overrides: dict[str, Any] = {}
    if round_settings.coordinator_data_dir:
        overrides["data_dir"] = Path(round_settings.coordinator_data_dir)
    if round_settings.coordinator_database_url:
        overrides["database_url"] = round_settings.coordinator_database_url
    return Settings(**overrides)


def node_namespace(prefix: str, node_id: int) -> str:
    """The namespace a node publishes under: its own, named by its Flower node id."""
    return f"{prefix}-{node_id}"


def node_uploader(session: Session, namespace: str, *, create: bool) -> Token:
    """The contributor token a node's replies are published with: the live contributor token
    named `namespace` (created, its secret discarded, when `create` and none exists). The
    ServerApp writes to the catalog directly, so the token is never presented; it scopes what
    the node may publish to its namespace and records who published.

    Raises `Rejected` when a live token of that name is a maintainer's (publishing with it
    would let the node write into every namespace), or when none exists and `create` is off.
    """
    # A worker token's name is a label, not a namespace: it neither blocks nor serves.
    live = [
        t
        for t in auth.list_tokens(session)
        if t.name == namespace and t.revoked_at is None and t.role != Role.WORKER
    ]
    if any(t.role == Role.MAINTAINER for t in live):
        raise Rejected(
            f"namespace {namespace!r} belongs to a maintainer token: Flower replies are only "
            "published with a contributor token (revoke it or choose another namespace prefix)"
        )
    if live:
        return min(live, key=lambda t: t.id)
    if not create:
        raise Rejected(
            f"no contributor token named {namespace!r}: create one with `phatgoose coordinator "
            f"create-token {namespace} --role contributor` to let this node publish, or run "
            "the round with create-node-tokens=true"
        )
    try:
        issued = auth.create_token(session, name=namespace, role=Role.CONTRIBUTOR)
    except ValueError as error:  # e.g. the name is owned already (a revoked token)
        session.rollback()
        raise Rejected(f"cannot create the contributor token {namespace!r}: {error}") from None
    log.info("created the contributor token %r for a Flower node", namespace)
    return issued.token


def rejection_text(error: PackageRejected | CoordinatorError) -> str:
    """A rejection for people: the message, then which check, file and tensor."""
    body = error.to_dict()
    where = ", ".join(f"{k} {body[k]}" for k in ("check", "file", "tensor") if body.get(k))
    return f"{body['message']} ({where})" if where else str(body["message"])


@dataclass
class CatalogRegistrar:
    """Registers replies in the coordinator's catalog through its one registration path
    (callable as a `Registrar`), and answers for the catalog in deltas: which tensors a
    node's namespace already stores, and their bytes."""

    session: Session
    blobs: BlobStore
    settings: Settings
    round_settings: RoundSettings

    def __call__(self, node_id: int, files: Mapping[str, Path]) -> str:
        namespace = node_namespace(self.round_settings.namespace, node_id)
        uploader = node_uploader(
            self.session, namespace, create=self.round_settings.create_node_tokens
        )
        try:
            version = register_expert_package(
                self.session,
                self.blobs,
                self.settings,
                files=files,
                uploader=uploader,
                channel=Channel.FLOWER,
            )
        except (PackageRejected, CoordinatorError) as error:
            self.session.rollback()
            raise Rejected(rejection_text(error)) from None
        return version.ref

    def known_tensors(self, node_id: int) -> list[str]:
        """The tensor digests of the latest version of each expert in the node's namespace
        (of its files stored in pieces: a piece after the header is one tensor)."""
        namespace = node_namespace(self.round_settings.namespace, node_id)
        latest = list_versions(self.session, namespace=namespace, limit=MAX_KNOWN_EXPERTS).items
        newest: dict[str, ExpertVersion] = {}
        for version in latest:  # ordered by name, then version: the last one wins
            newest[version.expert.name] = version
        files = [
            (f.sha256, f.size)
            for version in newest.values()
            for f in version.files
            if f.filename.endswith(".safetensors")
        ]
        stored = stored_files(self.session, files)
        self.session.commit()
        digests = (p.sha256 for s in stored.values() if not s.whole for p in s.pieces[1:])
        return list(dict.fromkeys(digests))

    def stored_tensor(self, sha256: str) -> bytes | None:
        where = stored_segments(self.session, [sha256]).get(sha256)
        self.session.commit()
        if where is None:
            return None
        try:
            with open_file(self.blobs, where) as reader:
                return reader.read()
        except BlobNotFound:
            return None


@contextmanager
def coordinator_registrar(round_settings: RoundSettings) -> Iterator[CatalogRegistrar]:
    """A registrar writing into the coordinator's catalog through its one registration path."""
    settings = coordinator_settings(round_settings)
    engine, sessions = open_database(settings)  # migrated, like the service itself
    try:
        blobs = open_blob_store(settings)
        with sessions() as session:
            yield CatalogRegistrar(session, blobs, settings, round_settings)
    finally:
        engine.dispose()


# ------------------------------------------------------------------------ the app
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """One round: train on every connected node, catalog what comes back, report."""
    request, round_settings = split_run_config(context.run_config)
    with coordinator_registrar(round_settings) as register:
        report = run_round(
            grid,
            request,
            register,
            min_nodes=round_settings.min_nodes,
            node_wait_seconds=round_settings.node_wait_seconds,
            timeout_seconds=round_settings.round_timeout_seconds or None,
            known=register.known_tensors,
            stored=register.stored_tensor,
        )
    # Printed: the run's log stream (`flwr run --stream`, `flwr log`) shows what landed.
    print(report.summary(), flush=True)
