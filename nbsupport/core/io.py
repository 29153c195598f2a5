"""Files a run writes: atomic writes (a kill never leaves half a file) and one JSON-lines log.

Every writer goes through ``<name>.tmp`` + ``os.replace``, so a reader sees the old file or the new one,
never a mix. The JSON-lines log (one record per line, appended and flushed) is what every trainer's
``metrics.jsonl`` and the MaskCut CLI's outputs use: reading tolerates a torn *last* line (the run was
killed while writing it) but refuses a corrupt line in the middle, which means the file was damaged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# Atomic writes


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _atomic(path, write: Callable) -> Path:
    """Run ``write(file)`` on ``<path>.tmp`` opened for binary writing, then move it onto ``path``; on any
    error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (``<path>.tmp`` then ``os.replace``)."""
    data = text.encode(encoding)
    return _atomic(path, lambda f: f.write(data))


def atomic_write_json(path, obj, indent: int | None = None) -> Path:
    """``json.dumps(obj)`` to ``path`` atomically (compact unless ``indent``)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def atomic_torch_save(obj, path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: a kill mid-save leaves the previous checkpoint intact."""
    import torch

    return _atomic(path, lambda f: torch.save(obj, f))


# --------------------------------------------------------------------------------------------------
# JSON-lines log


def append_jsonl(path, record: dict) -> None:
    """Append one record as a JSON line to ``path`` (created with its folder) and flush it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path) -> list[dict]:
    """Every record of a JSON-lines file (``[]`` when it does not exist). Blank lines are skipped; a last line
    that does not parse is a torn write of a killed run and is dropped; a line in the middle that does not
    parse (or is not a JSON object) raises ``ValueError`` naming the file and the line number."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if n == len(lines):
                break  # torn last line: the writer was killed mid-record
            raise ValueError(f"{path}:{n}: corrupt JSON line ({e}); the file is damaged, not just cut short") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object per line, got {type(rec).__name__}")
        out.append(rec)
    return out


def truncate_jsonl(path, keep: Callable[[dict], bool]) -> int:
    """Rewrite ``path`` (atomically) with only the records for which ``keep(record)`` is true, dropping a torn
    last line too; returns how many were kept. Used on resume to cut a log back to its checkpoint, so the
    resumed run's records follow without duplicates. A missing file stays missing (returns 0)."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept = [r for r in read_jsonl(path) if keep(r)]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(kept)
