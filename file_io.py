"""JSON / JSONL / pickle I/O with atomic writes, plus small directory and multiprocessing helpers.

Every writer goes through a temporary file in the target's directory and an `os.replace`, so a
reader never sees a half-written file, even if the writer is killed. Readers of JSONL stream
line by line and name the file and line number of any malformed line.
"""
import contextlib
import json
import multiprocessing
import os
import pickle
import tempfile


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


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Open a temporary file next to `path`; on success rename it over `path`, on error delete it."""
    create_dir(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
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


def iter_jsonl(file):
    """Yield one object per non-empty line; a malformed line raises DataError naming file:line."""
    _check_exists(file)
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None


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
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
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


def read_rows(file, fields):
    """Rows of a JSONL file, each checked to have `fields` (DataError naming file:line otherwise)."""
    rows = []
    for lineno, row in enumerate(iter_jsonl(file), 1):
        require_fields(row, fields, file, lineno)
        rows.append(row)
    return rows


def mp(func, data, processes=None):
    """Order-preserving parallel map of `func` over `data` (runs inline when processes <= 1)."""
    data = list(data)
    processes = min(processes or os.cpu_count() or 1, max(len(data), 1))
    if processes <= 1:
        return [func(x) for x in data]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        return pool.map(func, data, chunksize=max(1, len(data) // (processes * 4)))
