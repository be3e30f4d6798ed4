"""Generator quality that needs no labels and no GPU: do a document's pseudo-queries point back to
it, are they varied, and do the DocIDs tell documents apart with the document's own words.

qg_vllm.py and title_vllm.py write these figures per corpus next to their output
(`quality.json`); genir.py copies them into results.md; benchmarks/generator_quality.py compares
generators with them.
"""
import logging
import os
import random
import re
from collections import Counter

import bm25
from file_io import read_json, read_jsonl, write_json

log = logging.getLogger("quality")

WORD = re.compile(r"\w+")
# Fixed BM25 for self-retrieval, whatever the baseline's switches: no stemming, English stopwords,
# only documents sharing a term with the query.
SELF_RETRIEVAL_STEMMER = None
SELF_RETRIEVAL_POSITIVE_ONLY = True

QUERY_DEFINITIONS = {
    "self_retrieval": "mean over documents of the share of its pseudo-queries for which BM25 over the corpus "
                      "(no stemming, English stopwords) ranks the document first",
    "duplicate_share": "1 - unique / total, over each document's own pseudo-queries (case and spacing ignored)",
    "mean_words": "mean words per pseudo-query",
}
DOCID_DEFINITIONS = {
    "collision_rate": "share of documents whose DocID another document also has (case and spacing ignored)",
    "mean_words": "mean words per DocID",
    "in_document_share": "share of DocID words (lower case) that occur in the document",
    "fallback_share": "share of documents whose generated DocID was empty (after any normalising), given the "
                      "extractive teacher's DocID from the document's text instead",
}


def words(text):
    return WORD.findall(str(text).lower())


def _key(text):
    return " ".join(words(text))


def query_quality(docs, queries):
    """Pseudo-query figures of a corpus. `docs`: rows {"id", "doc"}; `queries`: {doc id: [query]}."""
    flat = [(doc_id, q) for doc_id, qs in queries.items() for q in qs if str(q).strip()]
    total = sum(len(qs) for qs in queries.values())
    unique = sum(len({_key(q) for q in qs}) for qs in queries.values())
    hits = Counter()
    if flat:
        index = bm25.BM25Index(docs, SELF_RETRIEVAL_STEMMER, SELF_RETRIEVAL_POSITIVE_ONLY)
        for (doc_id, _), top in zip(flat, index.search([q for _, q in flat], k=1)):
            hits[doc_id] += bool(top) and str(top[0]) == str(doc_id)
    shares = [hits[doc_id] / len(qs) for doc_id, qs in queries.items() if qs]
    return {
        "documents": len(queries),
        "queries": total,
        "self_retrieval": sum(shares) / len(shares) if shares else 0.0,
        "duplicate_share": 1 - unique / total if total else 0.0,
        "mean_words": sum(len(words(q)) for qs in queries.values() for q in qs) / total if total else 0.0,
        "definitions": QUERY_DEFINITIONS,
    }


def docid_quality(docs, docids):
    """DocID figures of a corpus. `docs`: rows {"id", "doc"}; `docids`: {doc id: DocID text}."""
    texts = {str(d["id"]): d["doc"] for d in docs}
    keys = Counter(_key(g) for g in docids.values())
    collided = sum(keys[_key(g)] > 1 for g in docids.values())
    found = total = 0
    for doc_id, gist in docids.items():
        vocabulary = set(words(texts.get(str(doc_id), "")))
        gist_words = words(gist)
        found += sum(w in vocabulary for w in gist_words)
        total += len(gist_words)
    n = len(docids)
    return {
        "documents": n,
        "collision_rate": collided / n if n else 0.0,
        "mean_words": total / n if n else 0.0,
        "in_document_share": found / total if total else 0.0,
    }


def docid_report(docs, raw, final, fallback=()):
    """DocID figures on the generated text (`raw`) and after post-processing (`final`), with the share of
    documents whose final DocID came from the extractive fallback (ids in `fallback`)."""
    return {"raw": docid_quality(docs, raw), "final": docid_quality(docs, final),
            "fallback_share": len(set(fallback) & set(final)) / len(final) if final else 0.0,
            "definitions": DOCID_DEFINITIONS}


def report_path(output_path):
    """`<dir>/<name>.jsonl` -> `<dir>/<name>.quality.json`."""
    return os.path.splitext(output_path)[0] + ".quality.json"


def sample_ids(docs, n, seed):
    """At most `n` document ids (all when n is 0 or the corpus is smaller), drawn with `seed`."""
    ids = [str(d["id"]) for d in docs]
    return set(ids if not n or n >= len(ids) else random.Random(seed).sample(ids, n))


def is_current(output_path):
    """Whether the output's figures exist and are newer than the output."""
    path = report_path(output_path)
    return os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(output_path)


def write_report(output_path, figures, corpus, what):
    """Save the figures beside the output and log them."""
    path = report_path(output_path)
    write_json(figures, path)
    shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items() if k != "definitions"}
    log.info("%s %s quality: %s -> %s", corpus, what, shown, path)
    return path


def report_output(path, load_docs, n, seed, doc_key, figures, corpus, what):
    """Score a merged output beside it (unless its report is newer): `figures(docs, rows)` on the rows
    of at most `n` of its documents (`sample_ids` with `seed`; `doc_key(row)` names a row's document);
    `load_docs()` reads the corpus, only when the report is made."""
    if is_current(path):
        return
    docs = load_docs()
    sample = sample_ids(docs, n, seed)
    rows = [row for row in read_jsonl(path) if str(doc_key(row)) in sample]
    write_report(path, figures(docs, rows), corpus, what)


def read_report(output_path):
    path = report_path(output_path)
    return read_json(path) if os.path.exists(path) else None


COLUMNS = ["self-retrieval", "duplicate queries", "query words", "DocID collisions raw / final", "DocID words",
           "DocID words in document raw / final"]


def table(rows, labels):
    """Markdown table: per row, its `labels` cells then the figures of (queries, DocIDs) reports
    (either may be None: "-")."""
    fallback = any(d and "fallback_share" in d for _, _, d in rows)  # reports written before it lack the figure
    columns = COLUMNS + ["DocIDs from the fallback"] * fallback
    lines = ["| " + " | ".join(labels + columns) + " |",
             "| " + " | ".join(["---"] * len(labels) + ["---:"] * len(columns)) + " |"]
    for cells, q, d in rows:
        figures = ([f"{q['self_retrieval']:.1%}", f"{q['duplicate_share']:.1%}", f"{q['mean_words']:.1f}"]
                   if q else ["-"] * 3)
        figures += ([f"{d['raw']['collision_rate']:.1%} / {d['final']['collision_rate']:.1%}",
                     f"{d['final']['mean_words']:.1f}",
                     f"{d['raw']['in_document_share']:.1%} / {d['final']['in_document_share']:.1%}"]
                    if d else ["-"] * 3)
        if fallback:
            figures.append(f"{d['fallback_share']:.1%}" if d and "fallback_share" in d else "-")
        lines.append("| " + " | ".join(list(cells) + figures) + " |")
    return "\n".join(lines) + "\n"


def docid_collisions(corpus, tree, threshold):
    """A warning (in a list) when the DocIDs hardly tell documents apart: more than `threshold` of the
    documents share their DocID (their trie leaf) with another, whose documents ZeroGR can only
    return together, in id order."""
    sizes = tree.leaf_doc_ptr[1:] - tree.leaf_doc_ptr[:-1]
    rate = int(sizes[sizes > 1].sum()) / tree.doc_count
    if rate <= threshold:
        return []
    warning = (f"{corpus}: degenerate DocIDs: {rate:.0%} of {tree.doc_count} documents share their DocID with "
               f"another document ({tree.n_leaves} distinct DocIDs); ZeroGR returns each shared DocID's "
               "documents together, in id order")
    log.warning(warning)
    return [warning]
