"""Reading the pipeline's inputs: corpora (docs.jsonl) and a task's instruction from its queries file.

The ground floor under the scripts: it imports only file_io, mair_config, prompts and the standard
library. The other readers (queries, DocIDs, training rows) are to move here too.
"""
import logging
import os

import mair_config
from file_io import DataError, iter_rows
from prompts import GENERIC_INSTRUCTION

log = logging.getLogger("data")


def iter_docs(docs_path):
    """Stream (physical line, {"id": str, "doc": str}) over a docs.jsonl: a missing field or an empty
    corpus is an error; documents with empty text are counted and warned about at the end."""
    empty, examples, n = 0, [], 0
    for n, row in iter_rows(docs_path, ("id", "doc")):
        doc = {"id": str(row["id"]), "doc": row["doc"] if isinstance(row["doc"], str) else ""}
        if not doc["doc"].strip():
            empty += 1
            examples += [f"{doc['id']} (line {n})"][:3 - len(examples)]
        yield n, doc
    if not n:
        raise DataError(f"{docs_path}: empty corpus")
    if empty:
        log.warning("%s: %d document(s) with empty text, e.g. %s", docs_path, empty, ", ".join(examples))


def read_docs(docs_path):
    """Documents of a docs.jsonl (iter_docs), with duplicate ids an error."""
    docs, seen = [], {}
    for lineno, doc in iter_docs(docs_path):
        if doc["id"] in seen:
            raise DataError(f"{docs_path}:{lineno}: duplicate document id '{doc['id']}' (first on line "
                            f"{seen[doc['id']]})")
        seen[doc["id"]] = lineno
        docs.append(doc)
    return docs


def task_instruction(docs_path):
    """The task's instruction from its queries file (the MAIR-Queries twin of a MAIR-Docs docs path),
    as in the original: a generic one when the first and last queries' instructions differ or are
    empty, or when there is no queries file."""
    where = mair_config.split_docs_path(docs_path)
    if where is None:
        log.warning("%s: not a MAIR-Docs/<task>/docs.jsonl path, so no queries file; using the generic "
                    "instruction", docs_path)
        return GENERIC_INSTRUCTION
    queries_path = mair_config.queries_path(where[1], where[0])
    if not os.path.exists(queries_path):
        log.warning("%s: no queries file at %s; using the generic instruction", docs_path, queries_path)
        return GENERIC_INSTRUCTION
    first = last = None
    n = without = 0
    for _, row in iter_rows(queries_path):
        last = row.get("instruction") or ""
        first = last if first is None else first
        n += 1
        without += not last
    empty = [name for name, value in (("first", first), ("last", last)) if not value]
    if not n:
        reason = "no queries"
    elif empty:
        reason = f"the {' and '.join(empty)} quer{'ies have' if len(empty) > 1 else 'y has'} no instruction"
    elif first != last:
        reason = "the first and last queries' instructions differ"
    else:
        return first
    log.log(logging.WARNING if without else logging.INFO, "%s: %s (%d of %d queries without an instruction); "
            "using the generic instruction", queries_path, reason, without, n)
    return GENERIC_INSTRUCTION
