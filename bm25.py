"""BM25 with bm25s's Lucene variant (k1=1.5, b=0.75) and English stopwords: the baseline of every
results table and the source of the ranking loss's negatives. Two settings are the caller's (genir's
BM25_STEMMER and BM25_POSITIVE_ONLY): the PyStemmer algorithm (None: no stemming, as the released
code) and whether a ranking keeps only the documents sharing a term with the query (else, as the
released code, zero-score documents fill it up to k, in corpus order after the scored ones). The
index is built in chunks and saved as memory-mappable arrays.
"""
import functools
import itertools
import logging
import math
import os
import time
from collections.abc import Mapping

import bm25s
import numpy as np
import scipy.sparse as sp
import Stemmer

from file_io import read_json, write_json

log = logging.getLogger("bm25")

BM25_K1, BM25_B = 1.5, 0.75   # bm25s defaults (Lucene variant)
BM25_STOPWORDS = "en"
BM25_BATCH_CELLS = 2 ** 25    # queries x documents scored per sparse product (bounds memory)
BM25_CHUNK_DOCS = 10_000      # documents tokenized together while indexing (bounds memory)


class BM25Index:
    """A bm25s-style BM25 index of one corpus; `search` scores texts in sparse batches.

    `docs`: rows {"id", "doc"} or a mapping {doc_id: text}, read once as a stream: the texts are
    tokenized (bm25s's tokenizer) BM25_CHUNK_DOCS at a time into term counts, so the corpus is never
    all in memory. The term x document weights are bm25s's Lucene-variant scores, computed the way
    bm25s computes them; retrieval multiplies a batch of query term counts by that matrix and keeps
    the top-k documents with a positive score, ties broken by corpus order, then (unless
    `positive_only`) fills the list up to k with the zero-score documents in corpus order.
    `stemmer`: a PyStemmer algorithm ("english") or None (no stemming). `save` / `load` keep an
    index on disk (both settings with it); a loaded index memory-maps its weights, so processes
    loading it share one copy.
    """

    def __init__(self, docs, stemmer, positive_only):
        items = docs.items() if isinstance(docs, Mapping) else ((d["id"], d["doc"]) for d in docs)
        ids = []

        def texts():
            for doc_id, text in items:
                ids.append(str(doc_id))
                yield text or ""

        self._build(texts(), stemmer, positive_only)
        self.doc_ids = np.array(ids, dtype=object)
        if len(self.id_set) < len(ids):
            log.warning("BM25 index: %d duplicate doc ids", len(ids) - len(self.id_set))

    @classmethod
    def from_texts(cls, texts, stemmer, positive_only, doc_ids=None):
        """An index of streamed `texts`; `doc_ids`: their ids (any sequence; needed by `search`)."""
        index = cls.__new__(cls)
        index._build(texts, stemmer, positive_only)
        index.doc_ids = doc_ids
        return index

    def _build(self, texts, stemmer, positive_only):
        """The vocabulary {term: row} and the weights (CSR terms x documents) of streamed texts."""
        t0 = time.time()
        self.stemmer_name, self.positive_only = stemmer, bool(positive_only)
        self.stemmer = Stemmer.Stemmer(stemmer) if stemmer else None
        vocab, chunks = {}, []
        for chunk in batched(texts, BM25_CHUNK_DOCS):
            tokenized = self._tokenize(chunk, return_ids=True)
            for term in sorted(set(tokenized.vocab) - vocab.keys()):  # sorted: term rows do not depend on hashing
                vocab[term] = len(vocab)
            local = np.zeros(len(tokenized.vocab), np.int64)
            for term, i in tokenized.vocab.items():
                local[i] = vocab[term]
            length = np.fromiter(map(len, tokenized.ids), np.int64, len(chunk))
            flat = local[np.fromiter(itertools.chain.from_iterable(tokenized.ids), np.int64, int(length.sum()))]
            keys, tf = np.unique(np.repeat(np.arange(len(chunk), dtype=np.int64), length) << 32 | flat,
                                 return_counts=True)  # (document, term) pairs
            chunks.append(((keys & 0xFFFFFFFF).astype(np.int32), tf.astype(np.float32), length,
                           np.bincount(keys >> 32, minlength=len(chunk))))
        if not chunks:
            raise ValueError("BM25Index: empty corpus")
        lengths = np.concatenate([c[2] for c in chunks])
        df = np.zeros(len(vocab), np.int64)
        for c in chunks:
            df += np.bincount(c[0], minlength=len(vocab))
        values, where = np.unique(df, return_inverse=True)
        idf = np.array([math.log(1 + (len(lengths) - d + 0.5) / (d + 0.5)) for d in values.tolist()],
                       np.float32)[where]
        avg_len = lengths.mean()
        index_type = np.int32 if df.sum() < 2 ** 31 else np.int64
        indptr = np.concatenate([[0], np.cumsum(df)]).astype(index_type)
        data, indices = np.empty(indptr[-1], np.float32), np.empty(indptr[-1], index_type)
        free, first = indptr[:-1].astype(np.int64), 0
        chunks.reverse()
        while chunks:  # each chunk's entries go to their term's rows (documents in corpus order), then are freed
            terms, tf, length, per_doc = chunks.pop()
            weight = idf[terms] * (tf / (BM25_K1 * ((1 - BM25_B) + BM25_B * np.repeat(length, per_doc) / avg_len) + tf))
            order = np.argsort(terms, kind="stable")
            ranked = terms[order]
            at = free[ranked] + np.arange(len(order)) - np.searchsorted(ranked, ranked)
            data[at] = weight[order]
            indices[at] = np.repeat(np.arange(first, first + len(length)), per_doc)[order]
            free += np.bincount(terms, minlength=len(vocab))
            first += len(length)
        self.vocab = vocab
        self.weights = sp.csr_matrix((data, indices, indptr), shape=(len(vocab), len(lengths)), copy=False)
        log.info("BM25 index: %d docs, %d terms in %.1f s", len(lengths), len(vocab), time.time() - t0)

    def _tokenize(self, texts, return_ids):
        return bm25s.tokenize(list(texts), stopwords=BM25_STOPWORDS, stemmer=self.stemmer,
                              return_ids=return_ids, show_progress=False)

    def __len__(self):
        return self.weights.shape[1]

    @functools.cached_property
    def id_set(self):
        return set(self.doc_ids)

    @functools.cached_property
    def bm25(self):
        """The same index as a bm25s.BM25 object (bm25s's own scoring API on these weights)."""
        model = bm25s.BM25(k1=BM25_K1, b=BM25_B)
        model.scores = {"data": self.weights.data, "indices": self.weights.indices, "indptr": self.weights.indptr,
                        "num_docs": self.weights.shape[1]}
        model.vocab_dict, model.nonoccurrence_array = self.vocab, None
        return model

    def save(self, folder):
        """Write the weights and the vocabulary under `folder` (read back by `load`)."""
        os.makedirs(folder, exist_ok=True)
        for name in ("data", "indices", "indptr"):
            np.save(os.path.join(folder, f"{name}.npy"), getattr(self.weights, name))
        write_json({"stemmer": self.stemmer_name, "positive_only": self.positive_only, "k1": BM25_K1, "b": BM25_B,
                    "terms": sorted(self.vocab, key=self.vocab.get)}, os.path.join(folder, "vocab.json"), indent=None)

    @classmethod
    def load(cls, folder, doc_ids):
        """An index written by `save`, its weights memory-mapped; `doc_ids`: the ids of its documents
        in corpus order (any sequence of str)."""
        index = cls.__new__(cls)
        meta = read_json(os.path.join(folder, "vocab.json"))
        index.stemmer_name, index.positive_only = meta["stemmer"], meta["positive_only"]
        index.stemmer = Stemmer.Stemmer(meta["stemmer"]) if meta["stemmer"] else None
        index.vocab = {term: i for i, term in enumerate(meta["terms"])}
        arrays = tuple(np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r")
                       for name in ("data", "indices", "indptr"))
        index.weights = sp.csr_matrix(arrays, shape=(len(index.vocab), len(doc_ids)), copy=False)
        index.doc_ids = doc_ids
        return index

    def search(self, texts, k=100):
        """Top-min(k, N) doc ids per text, best first (with `positive_only`, only documents sharing a
        term with it; else zero-score documents fill the list, in corpus order)."""
        ids = self.doc_ids
        return [[ids[i] for i in top.tolist()] for top in self.search_indices(texts, k)]

    def search_indices(self, texts, k=100, positive_only=None):
        """`search` as corpus positions (int arrays); `positive_only` None: the index's own setting."""
        positive_only = self.positive_only if positive_only is None else positive_only
        if k < 1:
            raise ValueError(f"BM25Index.search: k must be >= 1, got {k}")
        t0, texts = time.time(), list(texts)
        rows, cols = [], []
        for i, tokens in enumerate(self._tokenize(texts, return_ids=False)):
            for tok in tokens:
                if tok in self.vocab:
                    rows.append(i)
                    cols.append(self.vocab[tok])
        n_texts, n_docs = len(texts), len(self)
        counts = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                               shape=(n_texts, self.weights.shape[0]))
        batch = max(1, BM25_BATCH_CELLS // n_docs)
        out = []
        for start in range(0, n_texts, batch):
            scores = (counts[start:start + batch] @ self.weights).tocsr()
            for i in range(scores.shape[0]):
                lo, hi = scores.indptr[i], scores.indptr[i + 1]
                out.append(_top(scores.data[lo:hi], scores.indices[lo:hi], k, n_docs, positive_only))
        if n_texts > 1:
            log.info("BM25 search: %d texts x %d docs in %.1f s", n_texts, n_docs, time.time() - t0)
        return out


def _top(values, indices, k, n_docs, positive_only):
    """Corpus positions of the top k of one text's (sparse) scores; unless `positive_only`, the
    documents without a score fill the list up to min(k, n_docs), in corpus order."""
    positive = values > 0
    values, indices = values[positive], indices[positive]
    if len(values) > k:  # keep every doc tied with the k-th score, then order and cut
        kth = np.partition(values, len(values) - k)[len(values) - k]
        keep = values >= kth
        values, indices = values[keep], indices[keep]
    top = indices[np.lexsort((indices, -values))[:k]].astype(np.int64)
    need = min(k, n_docs) - len(top)
    if positive_only or need <= 0:
        return top
    first = np.arange(len(top) + need)  # holds at least `need` unscored positions: the first ones
    return np.concatenate([top, first[~np.isin(first, top)][:need]])


def batched(items, n):
    """Lists of `n` consecutive items (the last one shorter)."""
    items = iter(items)
    while chunk := list(itertools.islice(items, n)):
        yield chunk


def bm25_search(index, queries, k=100, with_instruction=False):
    """BM25 rankings {qid: [doc_id, ...]} (see BM25Index.search) of a BM25Index for MAIR query rows.

    The query text is `query`, or `instruction + " " + query` with `with_instruction`.
    """
    queries = list(queries)
    texts = [f"{q.get('instruction') or ''} {q['query']}".strip() if with_instruction else q["query"]
             for q in queries]
    return {str(q["qid"]): ranking for q, ranking in zip(queries, index.search(texts, k))}
