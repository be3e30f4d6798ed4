"""The on-disk index of a corpus's training set (the folder train_data.py describes): its memory-mapped
tables (StringTable, DocTable) and how the main process builds it (build): document ids and DocIDs,
the examples' byte offsets, the ranking groups, the BM25 index, with NUM_PSEUDO's and QUERY_FILTER's
choice of pseudo-queries.
"""
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from array import array
from collections import deque
from collections.abc import Mapping

import numpy as np
from tqdm.auto import tqdm

import bm25
from data import docasq_rows, docid_warnings, task_instruction
from file_io import DataError, decode, iter_rows, read_json, require_fields, write_json, write_jsonl

log = logging.getLogger("train_data")

PROGRESS_EVERY = 1 << 16  # rows scanned between progress-bar updates
FILTER_BATCH = 1 << 14    # QUERY_FILTER: pseudo-queries searched together


def mapped(path):
    """A .npy array memory-mapped read-only (as a plain ndarray: np.memmap's indexing is slow)."""
    return np.load(path, mmap_mode="r").view(np.ndarray)


def id_hash(doc_id):
    """A stable 64-bit hash of a document id."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")


class StringTable:
    """Strings stored as UTF-8 bytes in <path>.bin with [start, end) of each in <path>.npy, both memory-mapped."""

    def __init__(self, path):
        self.bounds = mapped(path + ".npy")
        empty = not os.path.getsize(path + ".bin")  # an empty file cannot be mapped
        self.blob = np.zeros(0, np.uint8) if empty else np.memmap(path + ".bin", np.uint8, "r").view(np.ndarray)

    def __len__(self):
        return len(self.bounds)

    def __getitem__(self, i):
        start, end = self.bounds[i]
        return self.blob[start:end].tobytes().decode()


def append_text(file, text):
    """Write `text` to a StringTable's open .bin file; its [start, end)."""
    start = file.tell()
    file.write(text.encode())
    return start, file.tell()


class DocTable(Mapping):
    """A corpus's documents by position: ids (found through their hash) and DocIDs. As a mapping:
    doc id -> DocID over the documents that have one."""

    def __init__(self, folder):
        self.ids = StringTable(os.path.join(folder, "doc_ids"))
        self.keys = mapped(os.path.join(folder, "doc_keys.npy"))
        self.rows = mapped(os.path.join(folder, "doc_rows.npy"))
        path = os.path.join(folder, "docids")
        self.docids = StringTable(path) if os.path.exists(path + ".npy") else None  # None: not written yet
        bounds = np.zeros((len(self.ids), 2)) if self.docids is None else self.docids.bounds
        self.has_docid = np.asarray(bounds[:, 1] > bounds[:, 0])

    def find(self, doc_id):
        """Position of a document id in the corpus, -1 if unknown."""
        key = np.uint64(id_hash(doc_id))  # a plain int would make searchsorted compare as objects
        at = int(np.searchsorted(self.keys, key))
        if at < len(self.keys) and self.keys[at] == key:
            row = int(self.rows[at])
            if self.ids[row] == doc_id:
                return row
        return -1

    def __contains__(self, doc_id):
        row = self.find(doc_id) if isinstance(doc_id, str) else -1
        return row >= 0 and bool(self.has_docid[row])

    def __getitem__(self, doc_id):
        if doc_id not in self:
            raise KeyError(doc_id)
        return self.docids[self.find(doc_id)]

    def __len__(self):
        return int(self.has_docid.sum())

    def __iter__(self):
        return (self.ids[i] for i in range(len(self.ids)) if self.has_docid[i])


def build(corpus, docs, folder, sources, settings, stamp):
    """Write the training set folder (see train_data's docstring) with `stamp()` in its meta.json (called once
    the sources are all written), then move it into place."""
    started = time.time()
    for key, what, script in (("queries", "pseudo-queries", "qg_vllm.py"), ("docids", "DocIDs", "title_vllm.py")):
        if sources[key] and not os.path.exists(sources[key]):
            raise DataError(f"{corpus}: no {what} at {sources[key]} (run {script} first)")
    if sources["docasq"]:
        _docasq_file(corpus, docs, sources, settings)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    n_docs = _write_docs(docs, tmp, corpus, settings)
    warnings = _write_docids(sources["docids"], DocTable(tmp), tmp)
    table = DocTable(tmp)
    files = [p for p in (sources["queries"], sources["docasq"]) if p]
    first, counts, skipped, filtered = np.full(n_docs, -1, np.int64), [], 0, 0
    with open(os.path.join(tmp, "ex_offsets.bin"), "wb") as offsets, \
            open(os.path.join(tmp, "ex_docs.bin"), "wb") as ex_docs:
        for path in files:
            pseudo = path == sources["queries"]
            keep = _tie_back(path, table, tmp, settings.query_filter) if pseudo and settings.query_filter else None
            kept, left_out, dropped = _scan(path, table, offsets, ex_docs, first, sum(counts),
                                            settings.num_pseudo if pseudo else None, keep)
            counts.append(kept)
            skipped, filtered = skipped + left_out, filtered + dropped
    if skipped:
        log.warning("%s: %d training queries point to documents without a DocID; skipped", corpus, skipped)
    if settings.query_filter:
        log.info("%s: QUERY_FILTER=%d left out %d pseudo-queries whose document BM25 does not rank in its top %d",
                 corpus, settings.query_filter, filtered, settings.query_filter)
    if not sum(counts):
        raise DataError(f"{corpus}: no training examples (no training query points to a document with a DocID)")
    groups = np.sort(first[first >= 0])
    np.save(os.path.join(tmp, "groups.npy"), groups)
    if settings.rank_loss:
        np.lib.format.open_memmap(os.path.join(tmp, "bm25_top.npy"), "w+", np.int32,
                                  (len(groups), settings.negative_depth)).flush()
    write_json({"stamp": stamp(), "files": files, "docasq": sources["docasq"], "counts": counts,
                "docs": n_docs, "docids": len(table), "groups": len(groups), "skipped": skipped, "filtered": filtered,
                "warnings": warnings},
               os.path.join(tmp, "meta.json"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log.info("%s: training set of %d examples over %d documents -> %s (%.0f s)", corpus, sum(counts), n_docs,
             folder, time.time() - started)


def _docasq_file(corpus, docs, sources, settings):
    """Write the corpus's DocAsQ passages unless its file holds them for these settings (its settings file says
    so); a file without a settings file is someone's own data and is used as it is."""
    path, made = sources["docasq"], {"mode": settings.docasq_mode, "n": settings.docasq_n,
                                     "words": settings.docasq_words, "seed": settings.seed}
    record = os.path.splitext(path)[0] + ".settings.json"
    if os.path.exists(path) and (not os.path.exists(record) or read_json(record) == made):
        if not os.path.exists(record):
            log.info("%s: document-as-query examples from %s (not made here: used as they are)", corpus, path)
        return
    if os.path.exists(path):  # gone before the new record: a stop in between leaves no stale passages behind
        os.remove(path)
    write_json(made, record)
    write_jsonl(docasq_rows(docs, task_instruction(sources["docs"]), settings.docasq_n, settings.docasq_words,
                            settings.seed, settings.docasq_mode), path)
    log.info("%s: document-as-query examples (%s) -> %s", corpus, made, path)


def _write_docs(docs, folder, corpus, settings):
    """Document ids of the streamed corpus, its BM25 index (with the ranking loss or QUERY_FILTER) and its texts
    (DOCASQ_REDRAW); returns its size."""
    keys, bounds = array("Q"), array("q")

    def texts(ids):
        for row in tqdm(docs, desc=f"{corpus}: documents", unit=" docs", dynamic_ncols=True):
            keys.append(id_hash(row["id"]))
            bounds.extend(append_text(ids, row["id"]))
            yield row["doc"]

    def kept(rows, blob):  # DOCASQ_REDRAW cuts passages from the documents' text at training time
        for text in rows:
            if blob:
                text_bounds.extend(append_text(blob, text))
            yield text

    text_bounds, texts_file = array("q"), os.path.join(folder, "doc_texts.bin")
    with open(os.path.join(folder, "doc_ids.bin"), "wb") as ids, \
            open(texts_file, "wb") if settings.docasq_redraw else contextlib.nullcontext() as blob:
        if settings.rank_loss or settings.query_filter:
            bm25.BM25Index.from_texts(kept(texts(ids), blob), settings.bm25_stemmer, settings.bm25_positive_only) \
                .save(os.path.join(folder, "bm25"))
        else:
            deque(kept(texts(ids), blob), maxlen=0)
    if settings.docasq_redraw:
        np.save(os.path.join(folder, "doc_texts.npy"), np.frombuffer(text_bounds, np.int64).reshape(-1, 2))
    np.save(os.path.join(folder, "doc_ids.npy"), np.frombuffer(bounds, np.int64).reshape(-1, 2))
    keys = np.frombuffer(keys, np.uint64)
    rows = np.argsort(keys, kind="stable").astype(np.int32)
    keys = keys[rows]
    same = np.flatnonzero(keys[1:] == keys[:-1])
    if len(same):
        table = StringTable(os.path.join(folder, "doc_ids"))
        a, b = int(rows[same[0]]), int(rows[same[0] + 1])
        what = "duplicate document id" if table[a] == table[b] else f"hash collision with '{table[b]}' for"
        raise DataError(f"{corpus}: {what} '{table[a]}' (documents {a + 1} and {b + 1})")
    np.save(os.path.join(folder, "doc_keys.npy"), keys)
    np.save(os.path.join(folder, "doc_rows.npy"), rows)
    return len(rows)


def _write_docids(path, table, folder):
    """The DocIDs of the corpus's documents (the last one of a document wins; blank is none);
    returns the warnings (logged)."""
    bounds, unknown = np.zeros((len(table.ids), 2), np.int64), 0
    with open(os.path.join(folder, "docids.bin"), "wb") as blob:
        for lineno, row in tqdm(iter_rows(path, ("id", "gist")), desc="DocIDs", unit=" rows", dynamic_ncols=True):
            doc = table.find(str(row["id"]))
            if doc < 0:
                unknown += 1
                continue
            gist = str(row["gist"])
            bounds[doc] = append_text(blob, gist) if gist.strip() else (0, 0)
    np.save(os.path.join(folder, "docids.npy"), bounds)
    missing = np.flatnonzero(bounds[:, 1] == bounds[:, 0])
    warnings = docid_warnings(path, unknown, len(missing), len(bounds), [table.ids[i] for i in missing[:3]])
    for w in warnings:
        log.warning(w)
    return warnings


def _tie_back(path, table, folder, depth):
    """QUERY_FILTER: per line of a queries file, whether BM25 (the index in `folder`, documents sharing a term
    only) ranks the row's document within its top `depth` (a bytearray indexed by line number)."""
    index, keep, batch = bm25.BM25Index.load(os.path.join(folder, "bm25"), table.ids), bytearray(), []

    def run():
        tops = index.search_indices([text for _, text, _ in batch], depth, positive_only=True)
        for (lineno, _, doc), top in zip(batch, tops):
            keep[lineno] = doc >= 0 and doc in top
        batch.clear()

    for lineno, row in tqdm(iter_rows(path, ("query", "labels")), desc=f"QUERY_FILTER {os.path.relpath(path)}",
                            unit=" rows", unit_scale=True, dynamic_ncols=True):
        keep.extend(bytes(lineno + 1 - len(keep)))
        label = row["labels"][0] if isinstance(row["labels"], list) and row["labels"] else {}
        batch.append((lineno, str(row["query"]), table.find(str(label.get("id"))) if isinstance(label, dict) else -1))
        if len(batch) == FILTER_BATCH:
            run()
    if batch:
        run()
    return keep


def _scan(path, table, offsets_file, docs_file, first, base, limit, keep=None):
    """Append the offsets and documents of a queries file's rows whose document has a DocID (at most
    `limit` per document, the first in file order; None: all; and, when `keep` (by line number) is given,
    only the rows it keeps) to the two files, each document's first example (numbered from `base`) to
    `first`; (rows kept, skipped for want of a DocID, left out by `keep`)."""
    offsets, docs, kept, skipped, dropped = array("q"), array("i"), 0, 0, 0
    per_doc = np.zeros(len(first), np.int64) if limit is not None else None
    last_id, last_doc, position = None, -1, 0

    def flush():
        offsets_file.write(offsets.tobytes())
        docs_file.write(docs.tobytes())
        del offsets[:], docs[:]

    with open(path, "rb") as f, tqdm(desc=os.path.relpath(path), unit=" rows", unit_scale=True,
                                     dynamic_ncols=True) as bar:
        for lineno, line in enumerate(f, 1):
            start, position = position, position + len(line)
            if not lineno % PROGRESS_EVERY:
                bar.update(PROGRESS_EVERY)
                flush()
            if not line.strip():
                continue
            text = decode(line, path, lineno)  # before the try: DataError is a ValueError
            try:
                row = json.loads(text)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e})") from None
            if not (isinstance(row, dict) and "instruction" in row and "query" in row and row.get("labels")):
                require_fields(row, ("instruction", "query", "labels"), path, lineno)
                raise DataError(f"{path}:{lineno}: no label")
            doc_id = str(row["labels"][0]["id"])
            if doc_id != last_id:
                last_id, last_doc = doc_id, table.find(doc_id)
                last_doc = last_doc if last_doc >= 0 and table.has_docid[last_doc] else -1
            if last_doc < 0:
                skipped += 1
                continue
            if per_doc is not None:
                if per_doc[last_doc] >= limit:
                    continue
                per_doc[last_doc] += 1
            if keep is not None and not (lineno < len(keep) and keep[lineno]):
                dropped += 1
                continue
            if first[last_doc] < 0:
                first[last_doc] = base + kept
            offsets.append(start)
            docs.append(last_doc)
            kept += 1
        flush()
    return kept, skipped, dropped
