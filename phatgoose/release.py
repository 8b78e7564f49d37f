"""Releases for inference: `load_release(path_or_url)` -> a routed model in one call.

A release is a method and k over a fixed list of expert versions of one base model. Its
artifact is a JSON manifest (`release.json`, read into `protocol.ReleaseManifest`) plus the
experts' package files. It is read either from a coordinator
(`http://host:8765/api/v1/releases/3`: the manifest at `.../manifest`, each file at its
`url`, a path on the same server) or from a local release directory (`release.json` plus
each expert's files under its `path`), such as `phatgoose coordinator export-release 3 DIR`
writes. Every file is checked against its sha256 before use; downloads are cached, by
content, under the phatgoose cache directory. Only JSON and safetensors are read. This
module speaks HTTP and JSON only: it never imports the coordinator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import httpx

from protocol.release import (
    RELEASE_FILE,
    InvalidReleaseManifest,
    ReleasedExpert,
    ReleaseFile,
    ReleaseManifest,
    parse_release_manifest,
)

if TYPE_CHECKING:  # torch is imported when a release is loaded, not when this is imported
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from phatgoose.expert import Expert

log = logging.getLogger(__name__)

BaseModel = tuple["nn.Module", "PreTrainedTokenizerBase"]


class ReleaseError(ValueError):
    """A release manifest or one of its files is missing, malformed or does not match."""


def is_url(path_or_url: str | os.PathLike[str]) -> bool:
    return isinstance(path_or_url, str) and urlsplit(path_or_url).scheme in ("http", "https")


def read_release_manifest(
    path_or_url: str | os.PathLike[str], *, token: str | None = None, timeout: float = 60.0
) -> ReleaseManifest:
    """The release manifest from a coordinator URL, a release directory or a `release.json`."""
    if is_url(path_or_url):
        source = _manifest_url(str(path_or_url))
        response = httpx.get(source, headers=_auth(token), timeout=timeout, follow_redirects=True)
        if response.status_code != 200:
            raise ReleaseError(f"GET {source}: HTTP {response.status_code}: {response.text[:500]}")
        text = response.text
    else:
        path = Path(path_or_url)
        file = path / RELEASE_FILE if path.is_dir() else path
        if not file.is_file():
            raise ReleaseError(f"{file}: no release manifest ({RELEASE_FILE}) there")
        source, text = str(file), file.read_text(encoding="utf-8")
    try:
        return parse_release_manifest(json.loads(text))
    except json.JSONDecodeError as error:
        raise ReleaseError(f"{source}: not valid JSON ({error})") from None
    except InvalidReleaseManifest as error:
        raise ReleaseError(f"{source}: {error}") from None


def load_release(
    path_or_url: str | os.PathLike[str],
    *,
    base_model: BaseModel | str | None = None,
    token: str | None = None,
    cache_dir: Path | None = None,
) -> BaseModel:
    """Load a release for inference: `(routed model, tokenizer)`.

    `path_or_url`: a coordinator release URL (`http://host:8765/api/v1/releases/3`), a
    release directory or its `release.json`. `base_model`: a loaded `(model, tokenizer)`,
    a name or path for `phatgoose.models.load_base_model`, or None for the manifest's own
    base model name. Either way its weights must have the fingerprint the release names.
    `token`: a bearer token for a coordinator that does not serve reads publicly.
    `cache_dir`: where downloaded files are kept (default `<phatgoose cache>/experts`).
    """
    from phatgoose.routing import build_routed_model

    manifest = read_release_manifest(path_or_url, token=token)
    if is_url(path_or_url):
        directories = _download_experts(manifest, str(path_or_url), token, cache_dir)
    else:
        root = Path(path_or_url)
        root = root if root.is_dir() else root.parent
        directories = [_local_package(root, entry) for entry in manifest.experts]
    experts = [
        _load_expert(directory, entry)
        for directory, entry in zip(directories, manifest.experts, strict=True)
    ]

    model, tokenizer = _base_model(manifest, base_model)
    build_routed_model(
        model,
        experts,
        method=manifest.method,
        top_k=manifest.top_k or 1,  # None for methods that do not route per token
        expert=manifest.expert,
        tokenizer=tokenizer,
        router_numerics=manifest.router_numerics,
    )
    log.info(
        "loaded release %d: %s over %d experts on %s",
        manifest.number,
        manifest.method,
        len(experts),
        manifest.base_model.name,
    )
    return model, tokenizer


# --- the manifest ----------------------------------------------------------------------


def _manifest_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/manifest") else url + "/manifest"


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


# --- expert files ----------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _local_package(root: Path, entry: ReleasedExpert) -> Path:
    directory = root / entry.path
    for file in entry.files:
        path = directory / file.filename
        if not path.is_file():
            raise ReleaseError(f"{entry.ref}: {path} is missing from the release directory")
        if _sha256(path) != file.sha256:
            raise ReleaseError(
                f"{entry.ref}: {path} does not match its sha256 {file.sha256} "
                "(changed or corrupted)"
            )
    return directory


def _download_experts(
    manifest: ReleaseManifest, release_url: str, token: str | None, cache_dir: Path | None
) -> list[Path]:
    from phatgoose.models import cache_root

    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "experts"
    directories = []
    with httpx.Client(headers=_auth(token), timeout=300.0, follow_redirects=True) as client:
        for entry in manifest.experts:
            directory = cache / entry.package_digest.removeprefix("sha256:")
            for file in entry.files:
                _download_file(client, urljoin(release_url, file.url), directory, file)
            directories.append(directory)
    return directories


def _download_file(client: httpx.Client, url: str, directory: Path, file: ReleaseFile) -> None:
    """Fetch one file into `directory` unless a copy with its sha256 is there already.

    Bytes go to a temp file, are hashed while written and renamed into place only if they
    match: the cache never holds a partial or wrong file under a real name.
    """
    target = directory / file.filename
    if target.is_file() and _sha256(target) == file.sha256:
        return
    directory.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{file.filename}-", dir=directory)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as out, client.stream("GET", url) as response:
            if response.status_code != 200:
                raise ReleaseError(f"GET {url}: HTTP {response.status_code}")
            for chunk in response.iter_bytes():
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != file.sha256:
            raise ReleaseError(
                f"{url}: downloaded bytes have sha256 {digest.hexdigest()}, "
                f"the release says {file.sha256}"
            )
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("downloaded %s (%s)", url, file.sha256[:12])


def _load_expert(directory: Path, entry: ReleasedExpert) -> Expert:
    """The expert, named `namespace/name` as the release names it (names are unique there,
    while two packages may carry the same manifest name)."""
    from phatgoose.expert import Expert

    expert = Expert.load(directory)
    if expert.name == entry.full_name:
        return expert
    return dataclasses.replace(
        expert, manifest=expert.manifest.model_copy(update={"name": entry.full_name})
    )


# --- the base model --------------------------------------------------------------------


def _base_model(manifest: ReleaseManifest, base_model: BaseModel | str | None) -> BaseModel:
    from phatgoose.models import load_base_model, model_fingerprint

    identity = manifest.base_model
    if base_model is None or isinstance(base_model, str):
        loaded: BaseModel = load_base_model(base_model or identity.name)
    else:
        loaded = base_model
    model, tokenizer = loaded
    found = model_fingerprint(model)
    if found != identity.fingerprint:
        raise ReleaseError(
            f"the base model's weights ({found}) are not the release's base model "
            f"{identity.name!r} ({identity.fingerprint}); pass base_model= the right "
            "model (an already routed or PEFT-wrapped model fingerprints differently)"
        )
    return model, tokenizer
