"""Small file helpers shared by the token cache, the label store, the generation cache and the JSONL readers."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then ``os.replace``: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_record(line: str | bytes, where: str) -> Any:
    """One JSONL line parsed; ``ValueError`` naming ``where`` (file and line or byte) when it is not JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from None


def record_text(record: Any, field: str, where: str) -> str:
    """The string ``record[field]`` of a JSONL record; ``ValueError`` naming ``where``, the fields found and the
    fix (``text_field``) otherwise."""
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: no string field text_field={field!r} (found {found}); set text_field to the "
                         "field holding the text")
    return record[field]
