"""Hostile requests for every route of the app: hypothesis strategies built by walking
`app.routes`, so that a new route is fuzzed as soon as it exists.

For each route, `route_specs(app)` reads its method, path template, path and query
parameters (with their types, dependencies included) and whether it takes a JSON body. A
case (`RequestCase`) fills every path parameter and some query parameters with either a
value that reaches real rows (`alice`, `demo`, `1`) or a hostile one (integers past 64 bits,
negative, non-ASCII digits; `../`, percent-encoded NUL/CR/LF, invalid UTF-8, 10,000
characters, unicode, empty), adds unknown and repeated query keys, and for a JSON route
sends a valid body or one broken the way an attacker would (wrong types anywhere, deep
nesting, `1e999`, NaN literals, huge strings and integers, extra fields, duplicate keys,
invalid UTF-8, a BOM, truncation, wrong content types), as an anonymous client, a
contributor, a maintainer or with a malformed token.

Cases are sent as raw ASGI requests (`send_raw`): the path and query bytes arrive exactly as
drawn (an HTTP client would normalise `..` and re-encode the rest).

A JSON route needs a valid body to start from: `VALID_BODIES`, by the body model's name.
The multipart upload is fuzzed at depth by `fuzzing.py`; here it gets hostile bodies only.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import anyio
from fastapi import FastAPI
from fastapi.dependencies.utils import get_flat_dependant
from fastapi.routing import APIRoute, iter_route_contexts
from hypothesis import strategies as st
from starlette.types import Message

# --- routes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # int | str | bool | float | choice
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str  # the template, e.g. /api/v1/experts/{namespace}/{name}
    path_params: tuple[Param, ...]
    query_params: tuple[Param, ...]
    body_model: str | None  # the JSON body's model name; None: no JSON body

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"


class UnknownParameter(TypeError):
    """A parameter whose type the strategies do not know: add it to `_param`."""


# Routes whose body is not JSON: fuzzed in depth elsewhere, hostile bodies only here.
MULTIPART_ROUTES = {("POST", "/api/v1/experts")}  # tests/reliability/test_fuzz_upload.py


def _param(name: str, annotation: Any) -> Param:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _param(name, args[0])
    if origin is typing.Literal:
        return Param(name, "choice", tuple(str(a) for a in typing.get_args(annotation)))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return Param(name, "choice", tuple(str(m.value) for m in annotation))
    if annotation is bool:
        return Param(name, "bool")
    if annotation is int:
        return Param(name, "int")
    if annotation is float:
        return Param(name, "float")
    if annotation is str:
        return Param(name, "str")
    if origin is list and args == [str]:  # a repeatable query parameter: one value is sent
        return Param(name, "str")
    raise UnknownParameter(f"parameter {name!r}: no strategy for {annotation!r}")


def route_specs(app: FastAPI) -> list[RouteSpec]:
    """Every (method, route) of the app, HEAD aside (Starlette answers it as GET)."""
    specs = []
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        path = context.path
        assert path is not None
        methods = sorted((context.methods or set()) - {"HEAD"})
        if not isinstance(route, APIRoute):  # /openapi.json, /docs, /redoc
            specs += [RouteSpec(m, path, (), (), None) for m in methods]
            continue
        flat = get_flat_dependant(context.dependant)
        path_params = tuple(_param(f.alias, f.field_info.annotation) for f in flat.path_params)
        query_params = tuple(_param(f.alias, f.field_info.annotation) for f in flat.query_params)
        body = context.body_field
        body_model = getattr(body.field_info.annotation, "__name__", "?") if body else None
        specs += [RouteSpec(m, path, path_params, query_params, body_model) for m in methods]
    return specs


# --- hostile values, as raw URL text ------------------------------------------------------

# Path parameters that reach real rows of the fuzz world (tests/reliability/test_fuzz_routes).
VALID_VALUES: dict[str, tuple[str, ...]] = {
    "namespace": ("alice",),
    "name": ("demo", "tiny", "site.css"),
    "version": ("1",),
    "filename": ("expert.json", "router.safetensors"),
    "number": ("1",),
    "job_id": ("1",),
    "result_id": ("1",),
    "limit": ("1", "2", "50"),
    "offset": ("0", "1"),
    "release": ("1",),
    "base_model": ("tiny",),
    "q": ("demo",),
    "tasks": ("navigate",),
    "sort": ("mean", "release", "task:navigate", "date"),
}

HOSTILE_INTEGERS = [
    str(2**31),
    str(2**31 - 1),
    str(2**63),
    str(2**63 - 1),
    str(2**64),
    "-1",
    "-" + str(2**63),
    "0",
    "-0",
    str(10**30),
    "9" * 5000,
    "%D9%A1",  # ١ (Arabic-Indic one)
    "%C2%B2",  # ² (superscript two)
    "%EF%BC%91",  # １ (fullwidth one)
    "1e3",
    "1.5",
    "0x10",
    "1_0",
    "+1",
    "%201",
    "NaN",
    "inf",
    "",
]

HOSTILE_TEXT = [
    "..",
    "../..",
    "../../../../etc/passwd",
    "%2e%2e",
    "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "..%2F..%2Fcoordinator.sqlite",
    "%2F",
    "%5C..%5C",
    "%00",
    "a%00b",
    "%0D%0AX-Injected:%201",
    "%0A",
    "%FF",
    "%FE%FF",
    "%ED%A0%80",  # an encoded lone surrogate (invalid UTF-8)
    "%C0%AE%C0%AE",  # overlong dots
    "%E2%80%AE",  # right-to-left override
    "%F0%9F%98%80",
    "%E6%A8%A1%E5%9E%8B",
    "%25",
    "%25%30%30",
    "%3Cscript%3E",
    "%22%27",
    ".",
    "",
    "%20",
    "x" * 10_000,
    ".tmp-upload-evil",
    "blobs%2Fab%2F" + "0" * 62,
    "%2Fetc%2Fpasswd",
]


def _quoted_text() -> st.SearchStrategy[str]:
    """Any text, percent-encoded as a client would send it."""
    return st.text(max_size=64).map(lambda s: quote(s, safe=""))


def raw_value(param: Param) -> st.SearchStrategy[str]:
    """A raw URL value for `param`: valid, hostile for its type, or anything."""
    valid = VALID_VALUES.get(param.name, ())
    options: list[st.SearchStrategy[str]] = [st.sampled_from(HOSTILE_TEXT), _quoted_text()]
    if param.kind in ("int", "float"):
        options.append(st.sampled_from(HOSTILE_INTEGERS))
        options.append(st.integers(min_value=-(2**70), max_value=2**70).map(str))
    if param.kind == "choice":
        options.append(st.sampled_from(param.choices))
    if param.kind == "bool":
        options.append(st.sampled_from(["true", "false", "1", "0", "yes", "2", "%00"]))
    if valid:
        options.append(st.sampled_from(valid))
    return st.one_of(options)


# --- bodies --------------------------------------------------------------------------------


def _json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (keys and list indexes), the root included."""
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:5]):
            paths += _json_paths(item, (*prefix, index))
    return paths


_SENTINEL = "\u0001fuzz\u0001"


def _replace_at(document: Any, path: tuple[Any, ...], raw: str) -> str:
    """`document` as JSON text with the value at `path` replaced by raw JSON text `raw`
    (which may be invalid JSON on purpose: `1e999`, `NaN`, a 5000-digit number)."""
    if not path:
        return raw
    copy = json.loads(json.dumps(document))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = _SENTINEL
    return json.dumps(copy).replace(json.dumps(_SENTINEL), raw, 1)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)

RAW_JSON_ATTACKS = [
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "-Infinity",
    "9" * 5000,
    "-" + "9" * 5000,
    str(2**64),
    str(-(2**63) - 1),
    '"\\ud800"',
    '"\\u0000"',
    '"a\\u0000b"',
    '"\\u202e"',
    '"../../etc/passwd"',
    '"' + "x" * 100_000 + '"',
    "[" * 5000 + "]" * 5000,
    '{"a":' * 2000 + "1" + "}" * 2000,
    "[]",
    "{}",
    '""',
    "null",
    "true",
    "0.1e-400",
    "1.0",
    '"1"',
    '{"$ref": "#"}',
]


@st.composite
def json_body(draw: st.DrawFn, valid: dict[str, Any]) -> tuple[str, bytes, str]:
    """(attack label, body bytes, content type) starting from a valid body."""
    kind = draw(
        st.sampled_from(
            [
                "valid",
                "wrong_type",
                "raw_value",
                "drop_field",
                "extra_field",
                "deep_nesting",
                "huge_string",
                "duplicate_keys",
                "invalid_utf8",
                "bom",
                "truncated",
                "not_an_object",
                "empty",
                "content_type",
                "garbage",
            ]
        )
    )
    content_type = "application/json"
    text = json.dumps(valid)
    paths = _json_paths(valid)
    if kind == "wrong_type":
        path = draw(st.sampled_from(paths[1:] or paths))
        text = _replace_at(valid, path, json.dumps(draw(JSON_VALUES)))
    elif kind == "raw_value":
        path = draw(st.sampled_from(paths))
        text = _replace_at(valid, path, draw(st.sampled_from(RAW_JSON_ATTACKS)))
    elif kind == "drop_field" and valid:
        key = draw(st.sampled_from(sorted(valid)))
        text = json.dumps({k: v for k, v in valid.items() if k != key})
    elif kind == "extra_field":
        text = json.dumps({**valid, draw(st.text(max_size=20)): draw(JSON_VALUES)})
    elif kind == "deep_nesting":
        depth = draw(st.sampled_from([100, 1000, 10_000, 100_000]))
        path = draw(st.sampled_from(paths))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        text = _replace_at(valid, path, opener * depth + "1" + closer * depth)
    elif kind == "huge_string":
        path = draw(st.sampled_from(paths))
        size = draw(st.sampled_from([1000, 70_000, 1_000_000]))
        text = _replace_at(valid, path, json.dumps(draw(st.sampled_from("xé\u202e模")) * size))
    elif kind == "duplicate_keys" and valid:
        key = draw(st.sampled_from(sorted(valid)))
        text = text[:-1] + f", {json.dumps(key)}: {json.dumps(draw(JSON_VALUES))}}}"
    elif kind == "not_an_object":
        text = json.dumps(draw(st.one_of(st.lists(JSON_VALUES, max_size=3), st.text(), st.none())))
    elif kind == "empty":
        text = ""
    elif kind == "content_type":
        content_type = draw(
            st.sampled_from(
                [
                    "text/plain",
                    "application/x-www-form-urlencoded",
                    "multipart/form-data; boundary=x",
                    "application/json; charset=latin-1",
                    "application/json; charset=utf-16",
                    "",
                    "application/json\r\nX-Injected: 1",
                    "ａpplication/json",
                ]
            )
        )
    body = text.encode("utf-8", "surrogatepass")
    if kind == "invalid_utf8":
        cut = draw(st.integers(min_value=0, max_value=len(body)))
        body = (
            body[:cut] + draw(st.sampled_from([b"\xff", b"\xc0\xae", b"\xed\xa0\x80"])) + body[cut:]
        )
    elif kind == "bom":
        body = b"\xef\xbb\xbf" + body
    elif kind == "truncated" and body:
        body = body[: draw(st.integers(min_value=0, max_value=len(body) - 1))]
    elif kind == "garbage":
        body = draw(st.binary(max_size=256))
    return kind, body, content_type


# --- identities and cases ------------------------------------------------------------------

HOSTILE_AUTHORIZATION = [
    b"Bearer",
    b"Bearer ",
    b"Bearer \x00",
    b"Bearer " + b"a" * 10_000,
    b"Bearer phg_x.y",
    b"Basic YWxhZGRpbjpvcGVuc2VzYW1l",
    b"bearer \xff\xfe",
]


@dataclass(frozen=True)
class RequestCase:
    label: str  # "<METHOD> <route>: <attack>"
    route: RouteSpec
    identity: str
    method: str
    raw_path: str
    query: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def describe(self) -> str:
        query = self.query[:200].decode("latin-1")
        return f"{self.label} as {self.identity}: {self.method} {self.raw_path[:300]}?{query}"


@st.composite
def request_cases(
    draw: st.DrawFn,
    routes: list[RouteSpec],
    tokens: dict[str, bytes],
    valid_bodies: dict[str, dict[str, Any]],
) -> RequestCase:
    """A hostile request to one of `routes`. `tokens`: identity -> Authorization header
    value (`anonymous` has none); `valid_bodies`: body model name -> a valid body."""
    route = draw(st.sampled_from(routes))
    identity = draw(st.sampled_from([*sorted(tokens), "anonymous", "forged"]))
    headers: list[tuple[bytes, bytes]] = [(b"host", b"testserver")]
    if identity == "forged":
        headers.append((b"authorization", draw(st.sampled_from(HOSTILE_AUTHORIZATION))))
    elif identity != "anonymous":
        headers.append((b"authorization", tokens[identity]))

    attacks = []
    raw_path = route.path
    for param in route.path_params:
        value = draw(raw_value(param))
        raw_path = raw_path.replace("{" + param.name + "}", value)
    query_parts = []
    for param in route.query_params:
        if draw(st.booleans()):
            query_parts.append(f"{param.name}={draw(raw_value(param))}")
    if draw(st.integers(min_value=0, max_value=4)) == 0:  # unknown and repeated keys
        key = draw(st.sampled_from(["offset", "limit", "x", "%00", "a[b]", ""]))
        query_parts += [f"{key}={draw(st.sampled_from(HOSTILE_INTEGERS + HOSTILE_TEXT))}"] * 2
        attacks.append("query_keys")
    query = "&".join(query_parts).encode("latin-1", "replace")
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        query += draw(st.sampled_from([b"%ff", b"&&&", b"=", b"a=%", b"\xff\xfe", b"%00=1"]))
        attacks.append("query_bytes")

    body = b""
    if route.body_model is not None:
        kind, body, content_type = draw(json_body(valid_bodies[route.body_model]))
        attacks.append(f"body:{kind}")
        if content_type:
            headers.append((b"content-type", content_type.encode("utf-8")))
    elif (route.method, route.path) in MULTIPART_ROUTES or route.method == "POST":
        body = draw(st.sampled_from([b"", b"{}", b"--x\r\n\r\n", b"\x00" * 64]))
        headers.append((b"content-type", b"multipart/form-data; boundary=x"))
        attacks.append("body:hostile")
    headers.append((b"content-length", str(len(body)).encode()))
    label = f"{route.label}: {'+'.join(attacks) or 'params'}"
    return RequestCase(label, route, identity, route.method, raw_path, query, tuple(headers), body)


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    raised: BaseException | None  # an exception that escaped the app (always a 5xx)

    def json(self) -> Any:
        return json.loads(self.body)


def send_raw(app: FastAPI, case: RequestCase) -> RawResponse:
    """Run `case` through the ASGI app exactly as drawn (no client-side normalisation)."""
    messages: list[Message] = []
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            await anyio.sleep(3600)  # the client waits: no disconnect mid-request
        sent = True
        return {"type": "http.request", "body": case.body, "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": case.method,
        "scheme": "http",
        # What uvicorn gives: the decoded path (invalid UTF-8 replaced) and the raw bytes.
        "path": unquote(case.raw_path),
        "raw_path": case.raw_path.encode("latin-1", "replace"),
        "query_string": case.query,
        "root_path": "",
        "headers": list(case.headers),
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "app": app,
    }
    raised: BaseException | None = None
    try:
        anyio.run(app, scope, receive, send)
    except Exception as error:  # Starlette re-raises after sending its 500
        raised = error
    starts = [m for m in messages if m["type"] == "http.response.start"]
    status = starts[0]["status"] if starts else 500
    headers = {
        k.decode("latin-1").lower(): v.decode("latin-1")
        for k, v in (starts[0]["headers"] if starts else [])
    }
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return RawResponse(status, headers, body, raised)
