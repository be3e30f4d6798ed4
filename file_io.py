"""JSON / JSONL / pickle I/O with atomic writes, plus small directory and multiprocessing helpers.

Every writer goes through a temporary file in the target's directory and an `os.replace`, so a
reader never sees a half-written file, even if the writer is killed; the file gets the
permissions the umask gives, as a plain `open` would. Readers of JSONL stream line by line and
name the file and physical line number (blank lines counted) of any malformed or non-UTF-8 line.
"""
import contextlib
import json
import logging
import multiprocessing
import os
import pickle
import tempfile

log = logging.getLogger("file_io")


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


def create_dir(file_path):
    """Create the parent directory of `file_path` if it does not exist."""
    dir_path = os.path.dirname(os.path.abspath(file_path))
    os.makedirs(dir_path, exist_ok=True)


def all_file(dirname):
    """All file paths below `dirname`, sorted."""
    out = []
    for root, _dirs, files in os.walk(dirname):
        out.extend(os.path.join(root, name) for name in files)
    return sorted(out)


def umask_mode(directory=False):
    """The mode a new file (or directory) gets under the current umask: 0o666 (0o777) & ~umask."""
    # os.umask can only be read by setting it; 0o077 meanwhile, so a file another thread creates in
    # this instant is at worst too private, never too open.
    mask = os.umask(0o077)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def apply_umask(directory):
    """Give `directory` and the files directly in it the modes the umask gives (some writers, e.g.
    safetensors and tempfile, make them 0600 / 0700)."""
    os.chmod(directory, umask_mode(directory=True))
    mode = umask_mode()
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            os.chmod(entry.path, mode)


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Open a temporary file next to `path`; on success rename it over `path`, on error delete it."""
    create_dir(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        os.fchmod(fd, umask_mode())  # mkstemp makes it 0600
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _check_exists(file):
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: no such file")


def decode(data, file, lineno=1):
    """`data` (bytes from line `lineno` of `file`) as UTF-8; a DataError naming line and column otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[:e.start]
        line = lineno + before.count(b"\n")
        column = len(before[before.rfind(b"\n") + 1:].decode("utf-8")) + 1
        raise DataError(f"{file}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})") from None


def iter_lines(file):
    """Yield (physical line number, text) for every non-blank line of a UTF-8 text file."""
    _check_exists(file)
    with open(file, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = decode(raw, file, lineno)
            if line.strip():
                yield lineno, line


def iter_jsonl(file, with_lines=False):
    """Yield one object per non-blank line, or (physical line number, object) pairs `with_lines`;
    a malformed line raises DataError naming file:line."""
    for lineno, line in iter_lines(file):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        yield (lineno, row) if with_lines else row


def read_jsonl(file):
    """All objects of a JSONL file as a list (streamed while parsing)."""
    return list(iter_jsonl(file))


def write_jsonl(rows, file):
    """Atomically write an iterable of objects, one JSON object per line."""
    with atomic_open(file) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def add_jsonl(rows, file):
    """Append objects to a JSONL file; each line is written and flushed whole."""
    create_dir(file)
    with open(file, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(file):
    _check_exists(file)
    with open(file, "rb") as f:
        text = decode(f.read(), file)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}: malformed JSON ({e.msg})") from None


def write_json(obj, file, indent=2):
    with atomic_open(file) as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def read_pkl(file):
    _check_exists(file)
    with open(file, "rb") as f:
        return pickle.load(f)


def write_pkl(obj, file):
    with atomic_open(file, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def require_fields(row, fields, file, lineno):
    """Raise DataError naming file:line and the first field of `fields` missing from `row`."""
    if not isinstance(row, dict):
        raise DataError(f"{file}:{lineno}: expected a JSON object, got {type(row).__name__}")
    for field in fields:
        if field not in row:
            raise DataError(f"{file}:{lineno}: missing field '{field}'")


def iter_rows(file, fields=()):
    """Yield (physical line number, object) for every row of a JSONL file, each checked to be an
    object with `fields` (DataError naming file:line otherwise)."""
    for lineno, row in iter_jsonl(file, with_lines=True):
        require_fields(row, fields, file, lineno)
        yield lineno, row


def is_blank(value):
    """True for None and for text that is empty or only whitespace."""
    return value is None or not str(value).strip()


def warn_skipped(file, lines, what):
    """One warning that len(lines) `what` of `file` were skipped, naming the first of their lines."""
    if lines:
        distinct = list(dict.fromkeys(lines))
        shown = ", ".join(map(str, distinct[:3])) + (", ..." if len(distinct) > 3 else "")
        log.warning("%s: %d %s skipped (line %s)", file, len(lines), what, shown)


def read_rows(file, fields, nonempty=()):
    """Rows of a JSONL file, each checked to have `fields` (DataError naming file:line otherwise).

    Rows with an empty value in one of the `nonempty` fields are skipped with one warning; if
    `nonempty` is given and no row is left, that is a DataError.
    """
    rows, skipped = [], []
    for lineno, row in iter_rows(file, fields):
        if any(is_blank(row[field]) for field in nonempty):
            skipped.append(lineno)
        else:
            rows.append(row)
    warn_skipped(file, skipped, f"row(s) with an empty {' or '.join(nonempty)}")
    if nonempty and not rows:
        raise DataError(f"{file}: no usable rows ({len(skipped)} with an empty {' or '.join(nonempty)})")
    return rows


def read_or_build_rows(path, fields, build, nonempty=(), max_rows=None, save=True):
    """The first `max_rows` rows of `path` (read_rows with `nonempty`); when `path` is missing,
    `build()`'s rows instead, written to `path` if `save`. No rows at all is a DataError."""
    if os.path.exists(path):
        rows = read_rows(path, fields, nonempty)
    else:
        rows = build()
        if not rows:
            raise DataError(f"{path} is missing and building it gave no rows")
        if save:
            write_jsonl(rows, path)
            log.info("built %d rows -> %s", len(rows), path)
    return rows[:max_rows] if max_rows else rows


def mp(func, data, processes=None):
    """Order-preserving parallel map of `func` over `data` (runs inline when processes <= 1)."""
    data = list(data)
    processes = min(processes or os.cpu_count() or 1, max(len(data), 1))
    if processes <= 1:
        return [func(x) for x in data]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        return pool.map(func, data, chunksize=max(1, len(data) // (processes * 4)))
