"""The one rule for a class name, wherever one enters: uploads, CSV files, label submissions,
the spec's positive class, request fields and query parameters.

A class name is at most :data:`MAX_LABEL_CHARS` printable characters with at least one that is not
blank; surrounding blanks are stripped. No C0/C1 control characters, no DEL, no slashes (a class
name becomes part of object keys and folder names).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

MAX_LABEL_CHARS = 100
RULE = f"1-{MAX_LABEL_CHARS} printable characters, no slashes"
_LABEL = re.compile(r"^[^\x00-\x1f\x7f-\x9f/\\]+$")
# the same rule for clients reading the OpenAPI document (at least one character that is not blank)
JSON_PATTERN = r"^[^\x00-\x1f\x7f-\x9f/\\]*[^\s\x00-\x1f\x7f-\x9f/\\][^\x00-\x1f\x7f-\x9f/\\]*$"


def valid_label(label: str) -> bool:
    """True for a class name people may give (already stripped of surrounding blanks)."""
    return 0 < len(label) <= MAX_LABEL_CHARS and bool(_LABEL.match(label))


def check_label(value: str) -> str:
    """``value`` stripped of surrounding blanks, or ValueError saying why it is not a class name."""
    label = value.strip()
    if len(value) > MAX_LABEL_CHARS or not valid_label(label):
        raise ValueError(f"{value[:40]!r} is not a valid class name ({RULE})")
    return label


ClassName = Annotated[
    str,
    AfterValidator(check_label),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": MAX_LABEL_CHARS, "pattern": JSON_PATTERN}),
]
"""A class name in a pydantic model: checked with :func:`check_label`, stored stripped."""
