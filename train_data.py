"""The generative retriever's training data, indexed on disk so that host memory does not grow with
the corpus: examples are read from their JSONL files by byte offset and tokenized when a batch asks
for them; document ids, DocIDs, the BM25 index and the ranking groups' BM25 candidates are
memory-mapped arrays, which the processes of a multi-GPU launch share through the page cache.
The main process builds a corpus's folder (again when a source file changes) while the others wait:
    meta.json                    sources (path, size, mtime), settings and counts; written last
    doc_ids.*, docids.*          document ids and DocIDs (StringTable; empty: no DocID), corpus order
    doc_texts.*                  DOCASQ_REDRAW: the documents' text (StringTable)
    doc_keys.npy, doc_rows.npy   64-bit hashes of the document ids, sorted, and their documents
    ex_offsets.bin, ex_docs.bin  per example: byte offset of its line (int64), its document (int32)
    groups.npy                   per ranking group: its example (each document's first)
    bm25/, bm25_top.npy          the BM25 index (bm25.BM25Index.save; with the ranking loss or QUERY_FILTER);
                                 int32 [groups, NEGATIVE_DEPTH]: each group's BM25 top documents, filled when
                                 first drawn (-1 pads)
train_index.py builds it.
"""
import contextlib
import ctypes
import json
import logging
import mmap
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

import bm25
import lm
import mair_config
import sft
import train_index
from data import DOCASQ_MODES, iter_docs, window_start
from file_io import DataError, read_json
from prompts import retrieval_prompt
from train_index import DocTable, StringTable, mapped

log = logging.getLogger("train_data")

FORMAT = 1          # bump when the folder's layout changes: older folders are rebuilt


@dataclass(frozen=True)
class TrainDataSettings:
    """genir's constants that the training set reads, in lower case (genir builds it with config.declared)."""
    data_root: str
    qg_sufix: str              # pseudo-queries: MAIR-Data/<qg_sufix>-<num_q>/<corpus>
    num_q: int
    num_pseudo: int | None     # pseudo-queries per document trained on, each document's first (None: all; 0: none)
    gist_type: str             # DocIDs: MAIR-Data/gist_ids/<corpus>/<gist_type>.jsonl
    docasq_n: int              # document-as-query passages per document (0: none)
    docasq_mode: str           # data.DOCASQ_MODES: how the passages are cut
    docasq_words: int
    docasq_redraw: bool        # "random" passages drawn again at every epoch after the first (else a fixed set)
    query_filter: int | None   # keep a pseudo-query only when BM25 ranks its document in this top (None: all)
    seed: int
    dist_timeout: float
    max_len: int
    max_instruction_tokens: int
    instruction_in_prompt: bool    # False: prompts are the query alone
    max_query_tokens: int
    rank_loss: bool            # with the ranking loss: the BM25 index and the groups' candidates
    negative_depth: int
    bm25_stemmer: str | None   # the BM25 index's PyStemmer algorithm (None: no stemming)
    bm25_positive_only: bool   # BM25 candidates: only documents sharing a term (else zero-score ones fill the list)
    batch_size: int
    group_size: int
    rank_every: int
    ranknet_mode: str          # negatives and short groups as rank_groups.RankGroups says


def check_settings(settings):
    """SystemExit naming the setting when NUM_PSEUDO, DOCASQ_MODE, DOCASQ_REDRAW or QUERY_FILTER is out of
    range or does not apply, or when they leave no training example."""
    b = settings.num_pseudo
    if b is not None and (not isinstance(b, int) or isinstance(b, bool) or not 0 <= b <= settings.num_q):
        raise SystemExit(f"NUM_PSEUDO={b!r}: must be None (all pseudo-queries) or an int from 0 to "
                         f"NUM_Q={settings.num_q}")
    if settings.docasq_mode not in DOCASQ_MODES:
        raise SystemExit(f"DOCASQ_MODE={settings.docasq_mode!r} is not one of {', '.join(map(repr, DOCASQ_MODES))}")
    depth = settings.query_filter
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 1):
        raise SystemExit(f"QUERY_FILTER={depth!r}: must be None (no filter) or a positive int (a BM25 depth)")
    if settings.docasq_redraw and not (_docasq_on(settings) and settings.docasq_mode == "random"):
        raise SystemExit(f"DOCASQ_REDRAW=True draws random passages again each epoch: it needs DOCASQ_MODE='random' "
                         f"and DOCASQ_N > 0 (not {settings.docasq_mode!r}, {settings.docasq_n})")
    if b == 0 and not _docasq_on(settings):
        off = "DOCASQ_MODE='none'" if settings.docasq_mode == "none" else f"DOCASQ_N={settings.docasq_n}"
        raise SystemExit(f"NUM_PSEUDO=0 with {off}: training would have no examples (no pseudo-query, no "
                         f"document-as-query passage)")


def _docasq_on(settings):
    return settings.docasq_n > 0 and settings.docasq_mode != "none"


class CorpusFile:
    """The documents of a docs.jsonl as a re-iterable stream of rows {"id": str, "doc": str}, with
    data.read_docs's checks (duplicate ids are caught when the document table is built)."""

    def __init__(self, path):
        self.path = path

    def __iter__(self):
        return (doc for _, doc in iter_docs(self.path))


def query_prompt(tokenizer, instruction, query, max_instruction_tokens, max_query_tokens):
    return retrieval_prompt(lm.truncate_tokens(tokenizer, instruction or "", max_instruction_tokens),
                            lm.truncate_tokens(tokenizer, query, max_query_tokens))


def encode(tokenizer, row, docid, settings):
    """{"input_ids", "labels"} of [instruction + "\\n" + query -> DocID] for a training row (the query alone
    without `instruction_in_prompt`)."""
    instruction = row["instruction"] if settings.instruction_in_prompt else ""
    prompt = query_prompt(tokenizer, instruction, row["query"], settings.max_instruction_tokens,
                          settings.max_query_tokens)
    return lm.encode_example(tokenizer, prompt, docid, settings.max_len)


def source_paths(corpus, settings):
    """The corpus's data files; "queries" (NUM_PSEUDO 0) and "docasq" (none made) may be None."""
    root = settings.data_root
    return {"docs": mair_config.corpus_docs_path(corpus, root),
            "docids": mair_config.gist_path(corpus, settings.gist_type, root),
            "queries": mair_config.pseudo_queries_path(corpus, settings.qg_sufix, settings.num_q, root)
            if settings.num_pseudo != 0 else None,
            "docasq": mair_config.docasq_path(corpus, settings.docasq_n, root, settings.docasq_mode)
            if _docasq_on(settings) else None}


def _stamp(sources, settings):
    files = {k: [os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] if p and os.path.exists(p) else None
             for k, p in sources.items()}
    return {"format": FORMAT, "files": files, "num_pseudo": settings.num_pseudo, "redraw": settings.docasq_redraw,
            "query_filter": settings.query_filter, "bm25": bool(settings.rank_loss or settings.query_filter),
            "depth": settings.negative_depth, "bm25_stemmer": settings.bm25_stemmer,
            "bm25_positive_only": settings.bm25_positive_only}


def prepare(corpus, docs, folder, settings):
    """The corpus's TrainingSet under `folder`. The main process (re)builds it from `docs` (an
    iterable of {"id", "doc"} rows, streamed) and the corpus's data files when it is missing or
    stale, while the others wait; bad data fails every process alike (DataError)."""
    check_settings(settings)
    sources, meta = source_paths(corpus, settings), os.path.join(folder, "meta.json")
    state = sft.init_distributed(settings.dist_timeout)
    failed = None
    if state.is_main_process and not (os.path.exists(meta) and read_json(meta)["stamp"] == _stamp(sources, settings)):
        try:
            train_index.build(corpus, docs, folder, sources, settings, lambda: _stamp(sources, settings))
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
        texts = os.path.join(folder, "doc_texts")
        self.texts = StringTable(texts) if os.path.exists(texts + ".npy") else None  # DOCASQ_REDRAW
        self.ends = np.cumsum(self.meta["counts"])
        self.maps = {}
        log.info("training set: %d examples (%s), %d of %d documents with a DocID", len(self),
                 " + ".join(map(str, self.meta["counts"])), len(self.docs), len(self.docs.ids))

    def __len__(self):
        return len(self.offsets)

    def path(self, i):
        """The file example i comes from."""
        return self.meta["files"][int(np.searchsorted(self.ends, i, side="right"))]

    def row(self, i):
        """The JSON row of example i."""
        path = self.path(i)
        if path not in self.maps:
            with open(path, "rb") as f:
                self.maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        data, start = self.maps[path], int(self.offsets[i])
        end = data.find(b"\n", start)
        return json.loads(data[start:end if end >= 0 else len(data)])


class EncodedExamples(torch.utils.data.Dataset):
    """A training set's examples as the retriever learns them, encoded when accessed. With DOCASQ_REDRAW, from
    the second epoch on (set_epoch) a DocAsQ example's passage is a window of its document drawn for that
    epoch and example (seeded: every process and a resumed run draw the same)."""

    def __init__(self, data, tokenizer, settings):
        self.data, self.tokenizer, self.settings, self.epoch = data, tokenizer, settings, 0

    def __len__(self):
        return len(self.data)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        data, s = self.data, self.settings
        row = data.row(i)
        if self.epoch:
            row = redrawn(data, i, row, s, f"{s.seed}:{self.epoch}:{i}")
        return encode(self.tokenizer, row, data.docs.docids[int(data.doc[i])], s)


def redrawn(data, i, row, settings, key):
    """Example i's `row` (TrainingSet `data`); with DOCASQ_REDRAW, a DocAsQ example's passage is instead a
    window of its document drawn by random.Random(`key`)."""
    if settings.docasq_redraw and data.path(i) == data.meta["docasq"]:
        words = data.texts[int(data.doc[i])].split()
        start = window_start(words, settings.docasq_words, random.Random(key))
        row = {**row, "query": " ".join(words[start:start + settings.docasq_words])}
    return row
