"""The coordinator's HTTP API as both sides name it: where it is mounted and the version
that every JSON body it returns carries (`api_version`)."""

from typing import Final, Literal

API_PREFIX: Final = "/api/v1"
API_VERSION: Final = 1
ApiVersion = Literal[1]  # the type of an `api_version` field
