"""The generative retriever's training data, indexed on disk so that host memory does not grow with
the corpus: examples are read from their JSONL files by byte offset and tokenized when a batch asks
for them; document ids, DocIDs, the BM25 index and the ranking groups' BM25 candidates are
memory-mapped arrays, which the processes of a multi-GPU launch share through the page cache.
The main process builds a corpus's folder (again when a source file changes) while the others wait:
    meta.json                    sources (path, size, mtime) and counts; written last
    doc_ids.*, docids.*          document ids and DocIDs (StringTable; empty: no DocID), corpus order
    doc_keys.npy, doc_rows.npy   64-bit hashes of the document ids, sorted, and their documents
    ex_offsets.bin, ex_docs.bin  per example: byte offset of its line (int64), its document (int32)
    groups.npy                   per ranking group: its example (each document's first)
    bm25/, bm25_top.npy          the BM25 index (bm25.BM25Index.save); int32 [groups, NEGATIVE_DEPTH]:
                                 each group's BM25 top documents, filled when first drawn (-1 pads)
"""
import contextlib
import ctypes
import hashlib
import json
import logging
import mmap
import os
import random
import shutil
import time
from array import array
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

import bm25
import lm
import mair_config
import sft
from data import docasq_rows, docid_warnings, iter_docs, task_instruction
from file_io import DataError, decode, iter_rows, read_json, require_fields, write_json, write_jsonl
from prompts import retrieval_prompt

log = logging.getLogger("train_data")

FORMAT = 1          # bump when the folder's layout changes: older folders are rebuilt
PROGRESS_EVERY = 1 << 16  # rows scanned between progress-bar updates
PAD_DOCID = "NONE"  # RANKNET_MODE "released": the DocID of the candidates that fill a short ranking group


@dataclass(frozen=True)
class TrainDataSettings:
    """genir's constants that the training set reads, in lower case (genir builds it with config.declared)."""
    data_root: str
    qg_sufix: str              # pseudo-queries: MAIR-Data/<qg_sufix>-<num_q>/<corpus>
    num_q: int
    gist_type: str             # DocIDs: MAIR-Data/gist_ids/<corpus>/<gist_type>.jsonl
    docasq_n: int              # document-as-query passages per document (0: none)
    docasq_words: int
    seed: int
    dist_timeout: float
    max_len: int
    max_instruction_tokens: int
    max_query_tokens: int
    rank_loss: bool            # with the ranking loss: the BM25 index and the groups' candidates
    negative_depth: int
    bm25_stemmer: str | None   # the BM25 index's PyStemmer algorithm (None: no stemming)
    bm25_positive_only: bool   # BM25 candidates: only documents sharing a term (else zero-score ones fill the list)
    batch_size: int
    group_size: int
    rank_every: int
    ranknet_mode: str          # negatives and short groups as RankGroups says


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


def _append(file, text):
    """Write `text` to a StringTable's open .bin file; its [start, end)."""
    start = file.tell()
    file.write(text.encode())
    return start, file.tell()


class CorpusFile:
    """The documents of a docs.jsonl as a re-iterable stream of rows {"id": str, "doc": str}, with
    data.read_docs's checks (duplicate ids are caught when the document table is built)."""

    def __init__(self, path):
        self.path = path

    def __iter__(self):
        return (doc for _, doc in iter_docs(self.path))


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


def query_prompt(tokenizer, instruction, query, max_instruction_tokens, max_query_tokens):
    return retrieval_prompt(lm.truncate_tokens(tokenizer, instruction or "", max_instruction_tokens),
                            lm.truncate_tokens(tokenizer, query, max_query_tokens))


def encode(tokenizer, row, docid, settings):
    """{"input_ids", "labels"} of [instruction + "\\n" + query -> DocID] for a training row."""
    prompt = query_prompt(tokenizer, row["instruction"], row["query"], settings.max_instruction_tokens,
                          settings.max_query_tokens)
    return lm.encode_example(tokenizer, prompt, docid, settings.max_len)


def source_paths(corpus, settings):
    root = settings.data_root
    return {"docs": mair_config.corpus_docs_path(corpus, root),
            "docids": mair_config.gist_path(corpus, settings.gist_type, root),
            "queries": mair_config.pseudo_queries_path(corpus, settings.qg_sufix, settings.num_q, root),
            "docasq": mair_config.docasq_path(corpus, settings.docasq_n, root) if settings.docasq_n > 0 else None}


def _stamp(sources, settings):
    files = {k: [os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] if p and os.path.exists(p) else None
             for k, p in sources.items()}
    return {"format": FORMAT, "files": files, "bm25": bool(settings.rank_loss), "depth": settings.negative_depth,
            "bm25_stemmer": settings.bm25_stemmer, "bm25_positive_only": settings.bm25_positive_only}


def prepare(corpus, docs, folder, settings):
    """The corpus's TrainingSet under `folder`. The main process (re)builds it from `docs` (an
    iterable of {"id", "doc"} rows, streamed) and the corpus's data files when it is missing or
    stale, while the others wait; bad data fails every process alike (DataError)."""
    sources, meta = source_paths(corpus, settings), os.path.join(folder, "meta.json")
    state = sft.init_distributed(settings.dist_timeout)
    failed = None
    if state.is_main_process and not (os.path.exists(meta) and read_json(meta)["stamp"] == _stamp(sources, settings)):
        try:
            build(corpus, docs, folder, sources, settings)
        except DataError as e:
            failed = e
        with contextlib.suppress(OSError, AttributeError):  # glibc would keep the build's freed heap
            ctypes.CDLL(None).malloc_trim(0)
    state.wait_for_everyone()
    if failed is not None:
        raise failed
    if not os.path.exists(meta):
        raise DataError(f"{corpus}: no training data at {folder}: the main process could not build it (see its log)")
    return TrainingSet(folder)


def build(corpus, docs, folder, sources, settings):
    """Write the training set folder (see the module's docstring), then move it into place."""
    started = time.time()
    for key, what, script in (("queries", "pseudo-queries", "qg_vllm.py"), ("docids", "DocIDs", "title_vllm.py")):
        if not os.path.exists(sources[key]):
            raise DataError(f"{corpus}: no {what} at {sources[key]} (run {script} first)")
    if sources["docasq"] and not os.path.exists(sources["docasq"]):
        write_jsonl(docasq_rows(docs, task_instruction(sources["docs"]), settings.docasq_n, settings.docasq_words,
                                settings.seed), sources["docasq"])
        log.info("%s: document-as-query examples -> %s", corpus, sources["docasq"])
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    n_docs = _write_docs(docs, tmp, corpus, settings)
    warnings = _write_docids(sources["docids"], DocTable(tmp), tmp)
    table = DocTable(tmp)
    files = [p for p in (sources["queries"], sources["docasq"]) if p]
    first, counts, skipped = np.full(n_docs, -1, np.int64), [], 0
    with open(os.path.join(tmp, "ex_offsets.bin"), "wb") as offsets, \
            open(os.path.join(tmp, "ex_docs.bin"), "wb") as ex_docs:
        for path in files:
            kept, left_out = _scan(path, table, offsets, ex_docs, first, sum(counts))
            counts.append(kept)
            skipped += left_out
    if skipped:
        log.warning("%s: %d training queries point to documents without a DocID; skipped", corpus, skipped)
    if not sum(counts):
        raise DataError(f"{corpus}: no training examples (no training query points to a document with a DocID)")
    groups = np.sort(first[first >= 0])
    np.save(os.path.join(tmp, "groups.npy"), groups)
    if settings.rank_loss:
        np.lib.format.open_memmap(os.path.join(tmp, "bm25_top.npy"), "w+", np.int32,
                                  (len(groups), settings.negative_depth)).flush()
    write_json({"stamp": _stamp(sources, settings), "files": files, "counts": counts, "docs": n_docs,
                "docids": len(table), "groups": len(groups), "skipped": skipped, "warnings": warnings},
               os.path.join(tmp, "meta.json"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log.info("%s: training set of %d examples over %d documents -> %s (%.0f s)", corpus, sum(counts), n_docs,
             folder, time.time() - started)


def _write_docs(docs, folder, corpus, settings):
    """Document ids (and the BM25 index with the ranking loss) of the streamed corpus; returns its size."""
    keys, bounds = array("Q"), array("q")

    def texts(ids):
        for row in tqdm(docs, desc=f"{corpus}: documents", unit=" docs", dynamic_ncols=True):
            keys.append(id_hash(row["id"]))
            bounds.extend(_append(ids, row["id"]))
            yield row["doc"]

    with open(os.path.join(folder, "doc_ids.bin"), "wb") as ids:
        if settings.rank_loss:
            bm25.BM25Index.from_texts(texts(ids), settings.bm25_stemmer, settings.bm25_positive_only).save(
                os.path.join(folder, "bm25"))
        else:
            deque(texts(ids), maxlen=0)
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
            bounds[doc] = _append(blob, gist) if gist.strip() else (0, 0)
    np.save(os.path.join(folder, "docids.npy"), bounds)
    missing = np.flatnonzero(bounds[:, 1] == bounds[:, 0])
    warnings = docid_warnings(path, unknown, len(missing), len(bounds), [table.ids[i] for i in missing[:3]])
    for w in warnings:
        log.warning(w)
    return warnings


def _scan(path, table, offsets_file, docs_file, first, base):
    """Append the offsets and documents of a queries file's rows whose document has a DocID to the two
    files, each document's first example (numbered from `base`) to `first`; (rows kept, skipped)."""
    offsets, docs, kept, skipped = array("q"), array("i"), 0, 0
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
                if last_doc >= 0 and first[last_doc] < 0:
                    first[last_doc] = base + kept
            if last_doc < 0:
                skipped += 1
                continue
            offsets.append(start)
            docs.append(last_doc)
            kept += 1
        flush()
    return kept, skipped


class TrainingSet:
    """A corpus's training examples (its pseudo-queries, then its DocAsQ passages, whose document has
    a DocID), read from their files by offset; with its DocTable, ranking groups and BM25 index."""

    def __init__(self, folder):
        self.folder = folder
        self.meta = read_json(os.path.join(folder, "meta.json"))
        self.docs = DocTable(folder)
        self.offsets = np.memmap(os.path.join(folder, "ex_offsets.bin"), np.int64, "r").view(np.ndarray)
        self.doc = np.memmap(os.path.join(folder, "ex_docs.bin"), np.int32, "r").view(np.ndarray)
        self.groups = mapped(os.path.join(folder, "groups.npy"))
        index = os.path.join(folder, "bm25")
        self.bm25 = bm25.BM25Index.load(index, self.docs.ids) if os.path.isdir(index) else None
        self.ends = np.cumsum(self.meta["counts"])
        self.maps = {}
        log.info("training set: %d examples (%s), %d of %d documents with a DocID", len(self),
                 " + ".join(map(str, self.meta["counts"])), len(self.docs), len(self.docs.ids))

    def __len__(self):
        return len(self.offsets)

    def row(self, i):
        """The JSON row of example i."""
        path = self.meta["files"][int(np.searchsorted(self.ends, i, side="right"))]
        if path not in self.maps:
            with open(path, "rb") as f:
                self.maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        data, start = self.maps[path], int(self.offsets[i])
        end = data.find(b"\n", start)
        return json.loads(data[start:end if end >= 0 else len(data)])


class EncodedExamples(torch.utils.data.Dataset):
    """A training set's examples as the retriever learns them, encoded when accessed."""

    def __init__(self, data, tokenizer, settings):
        self.data, self.tokenizer, self.settings = data, tokenizer, settings

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        data = self.data
        return encode(self.tokenizer, data.row(i), data.docs.docids[int(data.doc[i])], self.settings)


class RankGroups(sft.SeededBatches):
    """The ranking loss's batches: every rank_every steps, batch_size // group_size random groups (drawn by
    `rng`, whose state the epoch checkpoints keep), each a document's first training query with that
    document and group_size - 1 negatives drawn from the query's BM25 top negative_depth (over `index`, a
    BM25Index or the corpus rows; searched when the group is first drawn, kept in bm25_top) minus the
    positive and documents without a DocID (`docids`: doc id -> DocID). ranknet_mode "released": drawn again by
    `rng` at each draw, a short group padded with PAD_DOCID; "joint": by a generator seeded with (seed, group),
    the same at every draw, random documents with a DocID top up a short list (off with < group_size DocIDs)."""

    def __init__(self, tokenizer, index, docids, data, token_id, settings):
        self.index = index if isinstance(index, bm25.BM25Index) else \
            bm25.BM25Index(index, settings.bm25_stemmer, settings.bm25_positive_only)
        self.tokenizer, self.docids, self.data = tokenizer, docids, data
        self.token_id, self.settings = token_id, settings
        self.top = np.load(os.path.join(data.folder, "bm25_top.npy"), mmap_mode="r+")
        self.known = np.zeros(len(data.groups), bool)
        self.rng = random.Random(settings.seed)
        self.per_step = max(1, settings.batch_size // settings.group_size)
        fills = settings.ranknet_mode == "released" or len(docids) >= settings.group_size  # joint: enough DocIDs
        self.active = len(data.groups) > 0 and fills
        log.info("ranking loss: %d groups of %d (every %d steps, %s)%s", len(data.groups), settings.group_size,
                 settings.rank_every, settings.ranknet_mode, "" if self.active else f"; off: {len(docids)} DocIDs")

    def __call__(self, step):
        if not self.active or step % self.settings.rank_every != 0:
            return None
        examples, n = [], len(self.data.groups)
        for group in self.rng.sample(range(n), min(self.per_step, n)):
            example = int(self.data.groups[group])
            row = self.data.row(example)
            positive = self.data.docs.ids[int(self.data.doc[example])]
            gists = [self.docids[d] for d in [positive] + self.negatives(group, row["query"], positive)]
            for gist in gists + [PAD_DOCID] * (self.settings.group_size - len(gists)):
                examples.append(encode(self.tokenizer, row, gist, self.settings))
        batch = lm.collate(examples, self.tokenizer.pad_token_id)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "token_id": self.token_id, "group_size": self.settings.group_size}

    def candidates(self, group, query):
        """Corpus positions of a group's BM25 top documents, searched on first use."""
        if not self.known[group]:
            found = self.index.search_indices([query], self.top.shape[1])[0]
            row = np.full(self.top.shape[1], -1, np.int32)
            row[:len(found)] = found
            self.top[group] = row  # one write: processes filling the same group write the same bytes
            self.known[group] = True
        row = np.asarray(self.top[group])
        return row[row >= 0]

    def negatives(self, group, query, positive):
        ids, want = self.index.doc_ids, self.settings.group_size - 1
        found = [ids[i] for i in self.candidates(group, query).tolist()]
        found = [d for d in found if d != positive and d in self.docids]
        if self.settings.ranknet_mode == "released":  # drawn again, by the generator the checkpoints keep
            return self.rng.sample(found, min(want, len(found)))
        rng = np.random.default_rng([self.settings.seed, group])
        if len(found) >= want:
            return [found[j] for j in rng.choice(len(found), want, replace=False)]
        while len(found) < want:
            doc_id = ids[int(rng.integers(len(ids)))]
            if doc_id != positive and doc_id not in found and doc_id in self.docids:
                found.append(doc_id)
        return found
