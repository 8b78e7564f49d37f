import re

import pytest

from protocol import slug
from protocol.manifest import SLUG_PATTERN


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("My Adapter_v2", "my-adapter_v2"),
        ("parent/subtask", "parent-subtask"),
        ("--Été 2026!--", "t-2026"),
        ("___", "expert"),
        ("x" * 80, "x" * 63),
    ],
)
def test_slug_makes_a_valid_name_from_free_text(text, expected):
    assert slug(text) == expected
    assert re.fullmatch(SLUG_PATTERN, slug(text))
