"""Releases for inference: `load_release(path_or_url)` -> a routed model in one call.

A release is a method, its k and hyper-parameters over a fixed list of expert versions of
one base model (`load_release` builds the model with exactly those). Its artifact is a
JSON manifest (`release.json`, read into `protocol.ReleaseManifest`) plus the experts'
package files. It is read either from a coordinator
(`http://host:8765/api/v1/releases/3`: the manifest at `.../manifest`, each file at its
`url`, a path on the same server) or from a local release directory (`release.json` plus
each expert's files under its `path`), such as `phatgoose coordinator export-release 3 DIR`
writes. Every file is checked against its sha256 before use; downloads are cached, by
content, under the phatgoose cache directory. Only JSON and safetensors are read. This
module speaks HTTP and JSON only: it never imports the coordinator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import httpx

from protocol.limits import DEFAULT_LIMITS, KiB, MiB
from protocol.release import (
    RELEASE_FILE,
    InvalidReleaseManifest,
    ReleasedExpert,
    ReleaseFile,
    ReleaseManifest,
    parse_release_manifest,
)
from protocol.validation import PackageRejected, file_sha256, package_digest, validate_package

if TYPE_CHECKING:  # torch is imported when a release is loaded, not when this is imported
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from phatgoose.expert import Expert

log = logging.getLogger(__name__)

BaseModel = tuple["nn.Module", "PreTrainedTokenizerBase"]


class ReleaseError(ValueError):
    """A release manifest or one of its files is missing, malformed or does not match, or
    the server answered in a way the release protocol does not allow."""


# What a coordinator may send. The manifest of a 1000-expert release is a few MB; a file
# may not be bigger than admission allows (`protocol.DEFAULT_LIMITS`), nor trickle in more
# slowly than MIN_TRANSFER_RATE on average once the connection is up.
MAX_JSON_BYTES = 64 * MiB
MIN_TRANSFER_RATE = 64 * KiB  # bytes a second
MAX_REDIRECTS = 5


def is_url(path_or_url: str | os.PathLike[str]) -> bool:
    return isinstance(path_or_url, str) and urlsplit(path_or_url).scheme in ("http", "https")


def read_release_manifest(
    path_or_url: str | os.PathLike[str], *, token: str | None = None, timeout: float = 60.0
) -> ReleaseManifest:
    """The release manifest from a coordinator URL, a release directory or a `release.json`."""
    if is_url(path_or_url):
        with _Coordinator(str(path_or_url), token, timeout) as coordinator:
            return coordinator.manifest()
    path = Path(path_or_url)
    file = path / RELEASE_FILE if path.is_dir() else path
    if not file.is_file():
        raise ReleaseError(f"{file}: no release manifest ({RELEASE_FILE}) there")
    if file.stat().st_size > MAX_JSON_BYTES:
        raise ReleaseError(f"{file}: over {MAX_JSON_BYTES} bytes, too big for a manifest")
    return _parse_manifest(str(file), file.read_bytes())


def load_release(
    path_or_url: str | os.PathLike[str],
    *,
    base_model: BaseModel | str | None = None,
    token: str | None = None,
    cache_dir: Path | None = None,
    allow_yanked: bool = False,
    timeout: float = 60.0,
    exclude: Collection[str] | None = None,
) -> BaseModel:
    """Load a release for inference: `(routed model, tokenizer)`.

    `path_or_url`: a coordinator release URL (`http://host:8765/api/v1/releases/3`), a
    release directory or its `release.json`. `base_model`: a loaded `(model, tokenizer)`,
    a name or path for `phatgoose.models.load_base_model`, or None for the manifest's own
    base model name. Either way its weights must have the fingerprint the release names.
    `token`: a bearer token for a coordinator that does not serve reads publicly; it is
    sent to the release URL's own origin (scheme, host and port) and nowhere else.
    `cache_dir`: where downloaded files are kept (default `<phatgoose cache>/experts`).
    `allow_yanked`: load a release the coordinator has withdrawn, or one naming a yanked
    expert (refused by default; a warning is logged). `timeout`: seconds a connection or
    a read may stall. `exclude`: refs (`namespace/name@version`) of the release's experts
    to leave out, for a leave-one-out evaluation (docs/coordinator.md, "Credit"): the
    manifest is read and checked whole, as it is, then those experts are dropped before any
    of their files is read or the model is built; k is capped at the experts left (a
    release that routes over all N experts routes over the N - 1 others). A ref the release
    does not name, or leaving out every expert (or a `single` release's expert), is a
    `ReleaseError`.

    Nothing the server or the manifest says is trusted: every value is checked against the
    protocol's formats, files come only from the release URL's origin, sizes are enforced
    while streaming, every path stays inside the cache or the release directory, and each
    package is validated against the base model as the coordinator validates uploads.
    """
    from phatgoose.routing import build_routed_model

    if is_url(path_or_url):
        with _Coordinator(str(path_or_url), token, timeout) as coordinator:
            manifest = coordinator.manifest()
            _check_not_withdrawn(coordinator.status(), allow_yanked)
            entries = _kept_experts(manifest, exclude)
            cache = Path(cache_dir) if cache_dir is not None else _default_cache()
            directories = [coordinator.download(entry, cache) for entry in entries]
    else:
        manifest = read_release_manifest(path_or_url)
        entries = _kept_experts(manifest, exclude)
        root = Path(path_or_url)
        root = root if root.is_dir() else root.parent
        directories = [_local_package(root, entry) for entry in entries]

    model, tokenizer = _base_model(manifest, base_model)
    experts = [
        _load_expert(directory, entry, manifest, model)
        for directory, entry in zip(directories, entries, strict=True)
    ]
    build_routed_model(
        model,
        experts,
        method=manifest.method,
        # None for methods that do not route per token; capped when experts are left out.
        top_k=min(manifest.top_k or 1, max(len(experts), 1)),
        expert=manifest.expert,
        tokenizer=tokenizer,
        router_numerics=manifest.router_numerics,
        params=manifest.method_params,
    )
    log.info(
        "loaded release %d: %s %s over %d experts on %s%s",
        manifest.number,
        manifest.method,
        manifest.method_params,
        len(experts),
        manifest.base_model.name,
        f", leaving out {', '.join(sorted(exclude))}" if exclude else "",
    )
    return model, tokenizer


def _kept_experts(
    manifest: ReleaseManifest, exclude: Collection[str] | None
) -> list[ReleasedExpert]:
    """The manifest's experts without those `exclude` names (refs), in release order."""
    if not exclude:
        return list(manifest.experts)
    refs = [entry.ref for entry in manifest.experts]
    unknown = sorted(set(exclude) - set(refs))
    if unknown:
        raise ReleaseError(
            f"release {manifest.number}: cannot leave out {', '.join(unknown)}: not among its "
            f"experts ({', '.join(refs) if refs else 'none'})"
        )
    kept = [entry for entry in manifest.experts if entry.ref not in exclude]
    if not kept:
        raise ReleaseError(
            f"release {manifest.number}: leaving out {', '.join(sorted(exclude))} leaves no expert"
        )
    if manifest.expert is not None and manifest.expert not in {e.full_name for e in kept}:
        raise ReleaseError(
            f"release {manifest.number}: cannot leave out {manifest.expert}, the expert its "
            f"method {manifest.method!r} uses"
        )
    return kept


# --- the manifest ----------------------------------------------------------------------


def _parse_manifest(source: str, data: bytes) -> ReleaseManifest:
    try:
        return parse_release_manifest(json.loads(data, parse_constant=_no_constant))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ReleaseError(f"{source}: not valid JSON ({error})") from None
    except InvalidReleaseManifest as error:
        raise ReleaseError(f"{source}: {error}") from None


def _no_constant(token: str) -> Any:
    raise json.JSONDecodeError(f"{token} is not JSON", token, 0)


def _check_not_withdrawn(status: dict[str, Any], allow_yanked: bool) -> None:
    """Refuse a withdrawn release or one with a yanked expert, unless allowed. Older
    coordinators do not say: their releases load as before."""
    problems = []
    if status.get("withdrawn") is True:
        reason = status.get("withdrawn_reason")
        problems.append("the release is withdrawn" + (f" ({reason!r})" if reason else ""))
    yanked = status.get("yanked_experts")
    if isinstance(yanked, list) and yanked:
        problems.append("it names yanked expert(s) " + ", ".join(map(str, yanked[:20])))
    if not problems:
        return
    message = f"release {status.get('number')}: " + "; ".join(problems)
    if not allow_yanked:
        raise ReleaseError(message + " (pass allow_yanked=True to load it anyway)")
    log.warning("%s; loading it because allow_yanked=True", message)


# --- a coordinator ---------------------------------------------------------------------


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


class _Coordinator:
    """One coordinator's release: every request goes to the release URL's origin only.

    The token is a header of each request, never of the client, and redirects are
    followed by hand, within the origin: no answer can send it, or us, anywhere else.
    """

    def __init__(self, release_url: str, token: str | None, timeout: float) -> None:
        try:
            url = httpx.URL(release_url.rstrip("/").removesuffix("/manifest"))
        except httpx.InvalidURL as error:
            raise ReleaseError(f"{release_url}: not a URL ({error})") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ReleaseError(f"{release_url}: expected an http(s) release URL")
        self.release_url = url
        self.origin = _origin(url)
        self.token = token
        self.timeout = timeout
        self.client = httpx.Client(timeout=timeout, follow_redirects=False)

    def __enter__(self) -> _Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def manifest(self) -> ReleaseManifest:
        url = self.release_url.copy_with(path=self.release_url.path + "/manifest")
        return _parse_manifest(str(url), self._get_bytes(url))

    def status(self) -> dict[str, Any]:
        """The release's API record (withdrawn? yanked experts?): {} if it says nothing."""
        data = self._get_bytes(self.release_url)
        try:
            record = json.loads(data, parse_constant=_no_constant)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise ReleaseError(f"{self.release_url}: not valid JSON ({error})") from None
        return record if isinstance(record, dict) else {}

    def download(self, entry: ReleasedExpert, cache: Path) -> Path:
        """The expert's package folder in the cache, every file checked, fetched if need be."""
        directory = _inside(cache, entry.package_digest.removeprefix("sha256:"), entry.ref)
        hashes = {}
        for file in entry.files:
            _check_declared_size(entry, file)
            target = _inside(directory, file.filename, entry.ref)
            if target.is_file() and not target.is_symlink() and file_sha256(target) == file.sha256:
                hashes[file.filename] = file.sha256
                continue
            hashes[file.filename] = self._download_file(self._file_url(file), target, file)
        _check_package_digest(entry, hashes)
        return directory

    def _file_url(self, file: ReleaseFile) -> httpx.URL:
        url = self.release_url.join(file.url)
        if _origin(url) != self.origin:
            raise ReleaseError(
                f"{file.filename}: url {file.url!r} is not on the release's server "
                f"{self.release_url.scheme}://{self.release_url.netloc.decode()}"
            )
        return url

    @contextlib.contextmanager
    def _get(self, url: httpx.URL) -> Iterator[httpx.Response]:
        """A streamed 200 from `url`, following redirects that stay on the origin."""
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            try:
                request = self.client.build_request("GET", url, headers=headers)
                response = self.client.send(request, stream=True)
            except httpx.HTTPError as error:
                raise ReleaseError(f"GET {url}: {type(error).__name__}: {error}") from None
            try:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    try:
                        target = url.join(location)
                    except httpx.InvalidURL:
                        target = None
                    if target is None or _origin(target) != self.origin:
                        raise ReleaseError(
                            f"GET {url}: redirected to {location[:200]!r}, off the release's "
                            "server (not followed)"
                        )
                    url = target
                    continue
                if response.status_code != 200:
                    raise ReleaseError(
                        f"GET {url}: HTTP {response.status_code}: {_text_start(response)}"
                    )
                yield response
                return
            finally:
                response.close()
        raise ReleaseError(f"GET {url}: more than {MAX_REDIRECTS} redirects")

    def _get_bytes(self, url: httpx.URL) -> bytes:
        body = bytearray()
        with self._get(url) as response:
            for chunk in _chunks(response, url, MAX_JSON_BYTES, self.timeout):
                body += chunk
        return bytes(body)

    def _download_file(self, url: httpx.URL, target: Path, file: ReleaseFile) -> str:
        """Stream `url` into `target` through `write_verified`; returns its sha256."""
        with self._get(url) as response:
            try:
                write_verified(_chunks(response, url, file.size, self.timeout), target, file)
            except UnverifiedFile as error:
                raise ReleaseError(f"{url}: {error}") from None
        log.info("downloaded %s (%s)", url, file.sha256[:12])
        return file.sha256


class UnverifiedFile(ValueError):
    """Downloaded bytes that are not the file a release lists (its size or sha256)."""


def write_verified(
    chunks: Iterable[bytes], target: Path, file: ReleaseFile, *, temp_dir: Path | None = None
) -> None:
    """Write `chunks` to `target` only if they are exactly `file`'s bytes.

    They go to a temp file (in `temp_dir`, default beside `target`; either way on the same
    file system), are hashed while written and renamed into place only if size and sha256
    match: a cache never holds a partial or wrong file under a real name. Otherwise
    `UnverifiedFile`, and nothing is left behind. The library's release download and the
    remote evaluation worker's cache (`coordinator.worker_http`) both store through this.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = temp_dir if temp_dir is not None else target.parent
    handle, name = tempfile.mkstemp(prefix=f".{file.sha256[:16]}-", dir=folder)
    tmp = Path(name)
    try:
        digest, written = hashlib.sha256(), 0
        with os.fdopen(handle, "wb") as out:
            for chunk in chunks:
                written += len(chunk)
                if written > file.size:
                    raise UnverifiedFile(f"more than the {file.size} bytes the release lists")
                digest.update(chunk)
                out.write(chunk)
        if written != file.size:
            raise UnverifiedFile(f"got {written} bytes, the release lists {file.size}")
        if digest.hexdigest() != file.sha256:
            raise UnverifiedFile(
                f"the downloaded bytes have sha256 {digest.hexdigest()}, the release lists "
                f"{file.sha256}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _chunks(
    response: httpx.Response, url: httpx.URL, limit: int, timeout: float
) -> Iterator[bytes]:
    """The body, refused as soon as it passes `limit` bytes or falls behind the slowest
    transfer allowed (`timeout` plus `limit / MIN_TRANSFER_RATE` seconds in all)."""
    declared = response.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ReleaseError(f"GET {url}: {declared} bytes, more than the {limit} allowed")
    allowed_seconds = timeout + limit / MIN_TRANSFER_RATE
    deadline = time.monotonic() + allowed_seconds
    received = 0
    try:
        for chunk in response.iter_bytes():
            received += len(chunk)
            if received > limit:
                raise ReleaseError(f"GET {url}: more than the {limit} bytes allowed")
            if time.monotonic() > deadline:
                raise ReleaseError(
                    f"GET {url}: too slow ({received} bytes in {allowed_seconds:.0f} s)"
                )
            yield chunk
    except httpx.HTTPError as error:
        raise ReleaseError(f"GET {url}: {type(error).__name__}: {error}") from None


def _text_start(response: httpx.Response) -> str:
    try:
        data = next(iter(response.iter_bytes()), b"")
    except httpx.HTTPError:
        return ""
    return data[:500].decode("utf-8", "replace")


# --- expert files ----------------------------------------------------------------------


def _default_cache() -> Path:
    from phatgoose.models import cache_root

    return cache_root() / "experts"


def _inside(root: Path, name: str, ref: str) -> Path:
    """`root / name`, refused unless it resolves (symbolic links followed) to a direct child
    of `root`: the protocol already limits names; this makes escape impossible, not just
    refused by a pattern."""
    path = root / name
    resolved_root = root.resolve()
    if path.resolve().parent != resolved_root or Path(name).name != name:
        raise ReleaseError(f"{ref}: {name!r} would leave {root}")
    return path


def _check_declared_size(entry: ReleasedExpert, file: ReleaseFile) -> None:
    limit = DEFAULT_LIMITS.max_file_bytes(file.filename)
    if file.size > limit:
        raise ReleaseError(
            f"{entry.ref}: {file.filename} is declared as {file.size} bytes, over the "
            f"{limit} bytes a package file may have"
        )


def _check_package_digest(entry: ReleasedExpert, hashes: dict[str, str]) -> None:
    found = package_digest(hashes)
    if found != entry.package_digest:
        raise ReleaseError(
            f"{entry.ref}: its files have package digest {found}, the release says "
            f"{entry.package_digest}"
        )


def _local_package(root: Path, entry: ReleasedExpert) -> Path:
    """The expert's folder in a release directory; every file must resolve inside the
    directory (no symbolic link out of it) and match its sha256."""
    resolved_root = root.resolve()
    directory = root / entry.path
    hashes = {}
    for file in entry.files:
        path = directory / file.filename
        if not path.resolve().is_relative_to(resolved_root):
            raise ReleaseError(f"{entry.ref}: {path} leads outside the release directory")
        if not path.is_file():
            raise ReleaseError(f"{entry.ref}: {path} is missing from the release directory")
        hashes[file.filename] = file_sha256(path)
        if hashes[file.filename] != file.sha256:
            raise ReleaseError(
                f"{entry.ref}: {path} does not match its sha256 {file.sha256} "
                "(changed or corrupted)"
            )
    _check_package_digest(entry, hashes)
    return directory


def _load_expert(
    directory: Path, entry: ReleasedExpert, manifest: ReleaseManifest, model: nn.Module
) -> Expert:
    """The expert, validated against the base model as admission validates an upload (a
    hostile server may serve packages that never passed admission), and named
    `namespace/name` as the release names it (names are unique there, while two packages
    may carry the same manifest name)."""
    from phatgoose.expert import Expert
    from phatgoose.models import base_model_spec

    spec = base_model_spec(
        cast("PreTrainedModel", model), manifest.base_model.name, manifest.base_model.revision
    )
    files = {file.filename: directory / file.filename for file in entry.files}
    try:
        validate_package(files, spec, DEFAULT_LIMITS)
    except PackageRejected as error:
        raise ReleaseError(f"{entry.ref}: the package fails validation: {error}") from None
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
