"""The one results writer: append-only JSONL that survives a crash, and atomic files.

* `append_record` writes one JSON object per line and flushes + fsyncs it, so a
  finished unit is on disk before the next one starts; a SIGKILL can only cut
  the line being written.
* `read_records` parses a results file; a damaged *last* line (a write cut
  short) is reported, not silently dropped; a damaged line in the middle means
  the file was edited or corrupted and raises.
* `repair_trailing_line` moves a damaged last line aside (``.corrupt`` file)
  so a resumed run redoes that unit.
* `write_atomic` writes reports via a temporary file and ``os.replace``: a
  reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pathlib
import subprocess
import tempfile
from typing import Any, NamedTuple


class ResultsError(RuntimeError):
    pass


def code_revision() -> str:
    """The code a record came from: ``git:<commit>`` (``+dirty`` if the package or programs differ from it).

    Outside a git checkout (an installed wheel), ``sha1:<hash>`` of the
    package's source files, so two records of equal revision ran equal code.
    """
    package = pathlib.Path(__file__).resolve().parent
    root = package.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "trustsgd_jax", "experiments"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        return f"git:{commit}" + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        digest = hashlib.sha1()
        for f in sorted(package.rglob("*.py")):
            digest.update(f.relative_to(package).as_posix().encode() + b"\0" + f.read_bytes())
        return f"sha1:{digest.hexdigest()[:16]}"


def _clean(x: Any) -> Any:
    """JSON has no NaN/Inf: store them as strings so the file stays standard JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # numpy / jax scalars
        return _clean(x.item())
    if hasattr(x, "tolist"):
        return _clean(x.tolist())
    return x


def append_record(path: str | os.PathLike, record: dict) -> None:
    line = json.dumps(_clean(record), sort_keys=True, allow_nan=False)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


class Records(NamedTuple):
    records: list[dict]
    damaged_tail: str | None  # the damaged last line, if any
    good_bytes: int  # length of the file up to the last good line


def read_records(path: str | os.PathLike) -> Records:
    path = pathlib.Path(path)
    if not path.exists():
        return Records([], None, 0)
    raw = path.read_bytes()
    records: list[dict] = []
    offset = 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        is_last = i == len(lines) - 1
        if is_last and line == b"":
            break
        try:
            if is_last:  # no newline: the write was cut short, even if it parses
                raise ValueError("line has no terminating newline")
            rec = json.loads(line.decode("utf-8"))
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            if is_last or (i == len(lines) - 2 and lines[-1] == b""):
                return Records(records, line.decode("utf-8", "replace"), offset)
            raise ResultsError(
                f"{path}: line {i + 1} is not a valid record ({e}) and is not the last line; the file was "
                "edited or corrupted. Move it aside or fix that line; finished units are in the lines before it."
            ) from e
        records.append(rec)
        offset += len(line) + 1
    return Records(records, None, offset)


def repair_trailing_line(path: str | os.PathLike) -> str | None:
    """Cuts a damaged last line off `path` (saved to ``path.corrupt``); returns it, or None."""
    r = read_records(path)
    if r.damaged_tail is None:
        return None
    path = pathlib.Path(path)
    with open(path.with_suffix(path.suffix + ".corrupt"), "a", encoding="utf-8") as f:
        f.write(r.damaged_tail + "\n")
    with open(path, "r+b") as f:
        f.truncate(r.good_bytes)
        f.flush()
        os.fsync(f.fileno())
    return r.damaged_tail


def write_atomic(path: str | os.PathLike, content: str | bytes) -> None:
    path = pathlib.Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(_clean(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def ensure_workdir(workdir: str | os.PathLike) -> pathlib.Path:
    """Creates `workdir` and proves it writable, before any work starts."""
    path = pathlib.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write_test.", delete=True)
        probe.close()
    except OSError as e:
        raise ResultsError(
            f"workdir {str(path)!r} is not writable ({e}); pass --workdir to a writable directory."
        ) from e
    return path


def markdown_table(header, rows) -> list[str]:
    """Lines of a Markdown table: header, separator, one line per row of already formatted cells."""

    def line(cells):
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def write_table(table: str, path: str | os.PathLike | None = None) -> None:
    """Prints a benchmark/report table and, if `path` is given, writes it there atomically."""
    print(table)
    if path:
        write_atomic(path, table + "\n")


def save_figure(fig, path: str | os.PathLike, dpi: int = 130) -> None:
    """Saves a matplotlib figure as PNG atomically and closes it."""
    # Imported here: the results writer is imported by every unit and the tests; only figures need pyplot.
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
