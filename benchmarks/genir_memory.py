"""Host memory and start-up time of genir's training data on a synthetic corpus.

    python -m benchmarks.genir_memory --docs 200000 [--batches 20] [--tmp DIR] [--keep]

1. A separate process writes a corpus of --docs documents in the MAIR layout under a temporary
   DATA_ROOT: documents of ~150 words from a Zipf-like vocabulary, per document 16 pseudo-queries
   (10 of its words), 16 document-as-query passages (32 consecutive words) and a DocID (8 words),
   with the demo's instruction.
2. The measuring process builds genir's training data as genir.train_corpus does (training_queries,
   then training_data; ranking loss on) with the tiny model's tokenizer, then draws the first
   --batches LM batches (sft.sft_loader, as sft.train_sft) and the ranking batches due at those steps.
   Nothing is stored per token (examples are tokenized when drawn), so the vocabulary size (4096
   here, 128k for Llama 3) changes no stored width.
3. A fresh process opens the built data as every other rank of a launch does and draws the same
   batches; it also times the BM25 search of a group's query (lazily, when a group is first drawn)
   against searching every group up front.

Prints its figures and, as its last line, one JSON object: docs, examples, groups, peak_rss_mb (peak
resident growth of the building process from its start, after imports and the tokenizer: VmHWM,
mapped file pages included), seconds_to_first_batch (from the start of the build), private_mb (its
anonymous memory growth after the batches); rank_peak_rss_mb, rank_seconds_to_first_batch and
rank_private_mb, the same for the opening process (only its private part is not shared with the
other ranks through the page cache); data_mb (the training set folder on disk), corpus_mb,
ms_per_batch, bm25_ms_per_group and bm25_all_groups_s (the up-front alternative, extrapolated).
"""
import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import mair_config
import sft
from benchmarks.procmem import reset_peak, status_kb

CORPUS = "PyDoc-Net"
PER_DOC, DOC_WORDS, QUERY_WORDS, PASSAGE_WORDS, DOCID_WORDS = 16, 150, 10, 32, 8
VOCAB, ZIPF = 100_000, 1.07
WRITE_CHUNK = 5000
SEARCH_SAMPLE = 200
SEED = 0


def write_corpus(root, n_docs):
    """The synthetic corpus of `n_docs` documents under `root` (plain string formatting: every word is
    lowercase letters, so no JSON escaping is needed)."""
    from dataset.build_demo import DEMO_TASKS

    rng = np.random.default_rng(SEED)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, n)) for n in rng.integers(3, 11, VOCAB)])
    p = 1.0 / np.arange(1, VOCAB + 1) ** ZIPF
    head = f'{{"instruction": {json.dumps(DEMO_TASKS[CORPUS][2])}, "query": "'
    paths = [mair_config.corpus_docs_path(CORPUS, root), mair_config.gist_path(CORPUS, "title", root),
             mair_config.pseudo_queries_path(CORPUS, "QG", PER_DOC, root),
             mair_config.docasq_path(CORPUS, PER_DOC, root)]
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    files = [open(path, "w", encoding="utf-8") for path in paths]
    docs, gists, queries, docasq = files
    for start in range(0, n_docs, WRITE_CHUNK):
        text = words[rng.choice(VOCAB, (min(WRITE_CHUNK, n_docs - start), DOC_WORDS), p=p / p.sum())]
        for j, w in enumerate(text):
            doc_id = f"doc-{start + j}"
            tail = f'", "labels": [{{"id": "{doc_id}", "score": 1}}]}}\n'
            docs.write(f'{{"id": "{doc_id}", "doc": "{" ".join(w)}"}}\n')
            gists.write(f'{{"id": "{doc_id}", "gist": "{" ".join(w[rng.choice(DOC_WORDS, DOCID_WORDS, False)])}"}}\n')
            picks = rng.integers(0, DOC_WORDS, (PER_DOC, QUERY_WORDS))
            cuts = rng.integers(0, DOC_WORDS - PASSAGE_WORDS + 1, PER_DOC)
            for k in range(PER_DOC):
                queries.write(head + " ".join(w[picks[k]]) + tail)
                docasq.write(head + " ".join(w[cuts[k]:cuts[k] + PASSAGE_WORDS]) + tail)
    for f in files:
        f.close()


def rss_mb(field):
    return status_kb(field) / 1024


def measure(root, work, n_batches):
    """Build (or open) the training data as genir does and draw the first batches; a dict of figures."""
    import genir
    import lm
    import train_data
    from models import build_tiny

    genir.C.update(DATA_ROOT=root, MODEL_DIR=os.path.join(work, "models"), RUN="bench", NUM_Q=PER_DOC,
                   DOCASQ_N=PER_DOC, RANK_LOSS=True)
    tokenizer = lm.load_tokenizer(build_tiny.OUT_DIR)
    token_id = genir.rank_token_id(tokenizer)
    exact = reset_peak()
    before, anon = rss_mb("VmRSS"), rss_mb("RssAnon")
    started = time.time()
    data = genir.training_queries(CORPUS, train_data.CorpusFile(mair_config.corpus_docs_path(CORPUS, root)))
    examples, supplier = genir.training_data(data, tokenizer, token_id)
    built = time.time() - started
    loader = iter(sft.sft_loader(examples, genir.C["BATCH_SIZE"], genir.C["SEED"], tokenizer.pad_token_id))
    times = []
    for step in range(n_batches):
        t0 = time.time()
        next(loader)
        supplier(step)
        times.append(time.time() - t0)
        if step == 0:
            first = time.time() - started
    # without the reset, ru_maxrss (the peak since the process started, imports included) bounds it
    peak = rss_mb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {"examples": len(examples), "groups": len(supplier.data.groups), "build_s": round(built, 1),
               "first_s": round(first, 1), "peak_mb": round(peak - before, 1),
               "private_mb": round(rss_mb("RssAnon") - anon, 1),
               "ms_per_batch": round(1000 * float(np.mean(times[1:] or times)), 1)}
    return figures, supplier


def search_cost(supplier):
    """(ms per group searched alone, seconds for all groups searched up front in batches)."""
    data, index, depth = supplier.data, supplier.index, supplier.top.shape[1]
    picks = np.random.default_rng(SEED).choice(len(data.groups), min(SEARCH_SAMPLE, len(data.groups)), replace=False)
    texts = [data.row(int(data.groups[g]))["query"] for g in picks]
    t0 = time.time()
    for text in texts[:20]:
        index.search_indices([text], depth)
    alone = (time.time() - t0) / len(texts[:20])
    t0 = time.time()
    index.search_indices(texts, depth)
    batched = (time.time() - t0) / len(texts)
    return round(1000 * alone, 2), round(batched * len(data.groups), 1)


def run(args, role):
    """Run this script in a fresh process in `role`; its last stdout line, parsed."""
    cmd = [sys.executable, "-m", "benchmarks.genir_memory", "--role", role, "--root", args.root, "--work", args.work,
           "--docs", str(args.docs), "--batches", str(args.batches)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    sys.stderr.write(out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1]) if role != "write" else None


def folder_mb(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2 ** 20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--tmp", default=None, help="folder for the corpus and the training data (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and the built data")
    parser.add_argument("--role", choices=["write", "build", "open"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "write":
        write_corpus(args.root, args.docs)
        return
    if args.role:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        figures, supplier = measure(args.root, args.work, args.batches)
        if args.role == "open":
            figures["bm25_ms_per_group"], figures["bm25_all_groups_s"] = search_cost(supplier)
        print(json.dumps(figures))
        return
    args.work = tempfile.mkdtemp(prefix="genir_memory_", dir=args.tmp)
    args.root = os.path.join(args.work, "data")
    try:
        t0 = time.time()
        run(args, "write")
        print(f"wrote {args.docs:,} documents in {time.time() - t0:.0f} s ({folder_mb(args.root):,.0f} MB)")
        build, opened = run(args, "build"), run(args, "open")
        stats = {"docs": args.docs, "examples": build["examples"], "groups": build["groups"],
                 "peak_rss_mb": build["peak_mb"], "seconds_to_first_batch": build["first_s"],
                 "build_seconds": build["build_s"], "private_mb": build["private_mb"],
                 "rank_peak_rss_mb": opened["peak_mb"], "rank_seconds_to_first_batch": opened["first_s"],
                 "rank_private_mb": opened["private_mb"], "ms_per_batch": build["ms_per_batch"],
                 "bm25_ms_per_group": opened["bm25_ms_per_group"], "bm25_all_groups_s": opened["bm25_all_groups_s"],
                 "data_mb": round(folder_mb(os.path.join(args.work, "models")), 1),
                 "corpus_mb": round(folder_mb(args.root), 1), "cpus": os.cpu_count()}
        print(f"{args.docs:,} documents, {stats['examples']:,} examples: building process peak RSS growth "
              f"{stats['peak_rss_mb']} MB, first batch after {stats['seconds_to_first_batch']} s; another rank "
              f"{stats['rank_peak_rss_mb']} MB ({stats['rank_private_mb']} MB private), "
              f"{stats['rank_seconds_to_first_batch']} s; training data on disk {stats['data_mb']} MB; BM25 "
              f"{stats['bm25_ms_per_group']} ms per group when drawn vs {stats['bm25_all_groups_s']} s for all "
              f"groups up front")
        print(json.dumps(stats))
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
