"""Make the query generator's SFT data from public TRAINING sets. The paper's mix (ZeroGR-Train /
OpenInstIR: 69 tasks, 41.6 M pairs from the source datasets' training splits) is not public; this
builds a stand-in from datasets that are. Needs internet for the hub; local folders work offline.

    python -m dataset.qg_training msmarco hotpotqa fever            # names of SOURCES (the hub)
    python -m dataset.qg_training path/to/nq-train --instruction "Given a question, ..."   # a BEIR folder
    python -m dataset.qg_training msmarco --max-pairs 200000 --out dataset/MAIR-Data/sft/qg-train.jsonl

Every (query, relevant document) pair (qrels score > 0) of the source's training split becomes one
SFT_DATA row {"instruction", "query", "doc", "source"}: the instruction from SOURCES (one line per
dataset, edit freely), the document as BEIR joins it (title, space, text), the source's name (which
sftqg.py's EVAL_TASKS guard compares with the evaluation tasks). Sources:
  - a BEIR-format dataset: corpus.jsonl, queries.jsonl, qrels/<split>.tsv, from a local folder or the
    hub (BeIR/<name> and BeIR/<name>-qrels, see dataset/beir.py), or any hub dataset with a corpus,
    queries and qrels in BEIR's field names: a SOURCES entry {"hub": {"corpus": spec, "queries": spec,
    "qrels": spec}} of datasets.load_dataset arguments ("{split}" in a qrels value is filled in);
  - MS MARCO question answering (microsoft/ms_marco v2.1 train): each query with its passages marked
    is_selected.

Memory: nothing is loaded whole. A BEIR source is read in three streamed passes: (1) the qrels of the
split, kept as {doc id: [query ids]} (ids only; --max-pairs keeps the first N pairs), (2) the queries,
keeping the texts of those query ids only, (3) the corpus: each document named in the qrels is written
out with its queries as it streams past, and no document is kept. For MS MARCO passage ranking
(532,761 training pairs over an 8.8 M passage corpus) that holds about 0.5 M query texts and ids.
MS MARCO QnA rows carry their passages: one pass, nothing held.

Output: each source's rows go to <out stem>.parts/<source>.jsonl (written under a temporary name and
renamed when complete); then the parts of the named sources are concatenated into --out the same way,
with <out stem>.sources.json naming each source's dataset ids, split, pairs and instruction. A rerun
reuses the parts already made (resume after an interruption, or another mix); --overwrite remakes them.
"""
import argparse
import logging
import os
import shutil

from tqdm import tqdm

import mair_config
from dataset import beir
from file_io import DataError, atomic_open, write_json, write_jsonl

log = logging.getLogger("qg_training")

OUT = os.path.join(mair_config.DATA_ROOT, "MAIR-Data", "sft", "qg-train.jsonl")

# Source name -> its instruction and where its training pairs come from ("beir": the BEIR dataset on
# the hub, "split": its qrels split; "msmarco_qna": load_dataset arguments). One line per dataset.
SOURCES = {
    "msmarco": {"instruction": "Given a web search query, retrieve web passages that answer it.",
                "beir": "msmarco", "split": "train"},
    "msmarco-qna": {"instruction": "Given a web search query, retrieve web passages that answer it.",
                    "msmarco_qna": {"path": "microsoft/ms_marco", "name": "v2.1", "split": "train"}},
    "hotpotqa": {"instruction": "Given a multi-hop question, retrieve the Wikipedia passages that together "
                                "answer it.", "beir": "hotpotqa", "split": "train"},
    "fever": {"instruction": "Given a claim, retrieve the Wikipedia articles with evidence that supports or "
                             "refutes it.", "beir": "fever", "split": "train"},
    "fiqa": {"instruction": "Given a financial question, retrieve forum answers that address it.",
             "beir": "fiqa", "split": "train"},
    "nfcorpus": {"instruction": "Given a question about nutrition or health, retrieve medical articles "
                                "relevant to it.", "beir": "nfcorpus", "split": "train"},
    "scifact": {"instruction": "Given a scientific claim, retrieve the paper abstracts that support or "
                               "refute it.", "beir": "scifact", "split": "train"},
}


def _row(instruction, query, doc, source):
    return {"instruction": instruction, "query": query, "doc": doc, "source": source}


def beir_pairs(source, split, instruction, name, max_pairs=None):
    """Stream the SFT rows of a BEIR-format `source` (beir.Folder or beir.Hub), in three passes (see the
    module's docstring). No positive pair, or no query text for them, is a DataError naming the file."""
    by_doc, wanted, pairs = {}, set(), 0
    for _, qid, doc, score in tqdm(source.qrels(split), desc=f"{name}: {split} qrels", unit=" pairs",
                                   dynamic_ncols=True):
        if score <= 0 or qid in by_doc.get(doc, ()):
            continue
        if max_pairs and pairs >= max_pairs:
            break
        by_doc.setdefault(doc, {})[qid] = None
        wanted.add(qid)
        pairs += 1
    if not pairs:
        raise DataError(f"{source.file('qrels', split)}: no relevant (score > 0) pairs")
    texts, blank = {}, 0
    for _, q in tqdm(source.queries(), desc=f"{name}: queries", unit=" queries", dynamic_ncols=True):
        qid = str(q[beir.QUERY_ID])
        if qid in wanted:
            text = q.get(beir.QUERY) or ""
            blank += not text.strip()
            if text.strip():
                texts[qid] = text
    if not texts:
        raise DataError(f"{source.file('queries')}: no queries: none of the {len(wanted)} query ids of the {split} "
                        f"qrels has a text there ({blank} empty)")
    written, empty_docs = 0, 0
    for _, row in tqdm(source.corpus(), desc=f"{name}: corpus", unit=" docs", dynamic_ncols=True):
        qids = by_doc.pop(str(row[beir.DOC_ID]), None)
        if qids is None:
            continue
        doc = beir.doc_text(row)
        if not doc:
            empty_docs += len(qids)
            continue
        for qid in qids:
            if qid in texts:
                written += 1
                yield _row(instruction, texts[qid], doc, name)
    lost = {"pairs whose document is not in the corpus": sum(len(q) for q in by_doc.values()),
            "pairs whose document is empty": empty_docs, "queries of the qrels without text": len(wanted) - len(texts)}
    for what, count in lost.items():
        if count:
            log.warning("%s: %d %s, skipped", name, count, what)
    log.info("%s: %d pairs from %d positive qrels", name, written, pairs)


def msmarco_qna_pairs(spec, instruction, name, max_pairs=None):
    """Stream the SFT rows of MS MARCO QnA (microsoft/ms_marco; fields query, passages.is_selected,
    passages.passage_text): each query with each of its selected passages."""
    written, where = 0, beir.describe(spec)
    for i, row in enumerate(tqdm(beir.load_rows(spec), desc=f"{name}: queries", unit=" queries",
                                 dynamic_ncols=True), 1):
        passages = row.get("passages")
        if "query" not in row or not isinstance(passages, dict):
            raise DataError(f"{where} row {i}: needs a 'query' and 'passages' {{'is_selected', 'passage_text'}}")
        selected, texts = passages.get("is_selected"), passages.get("passage_text")
        if selected is None or texts is None or len(selected) != len(texts):
            raise DataError(f"{where} row {i}: 'passages' needs 'is_selected' and 'passage_text' of one length")
        if not str(row["query"] or "").strip():
            continue
        for chosen, text in zip(selected, texts):
            if chosen and str(text or "").strip():
                if max_pairs and written >= max_pairs:
                    return
                written += 1
                yield _row(instruction, row["query"], text, name)
    if not written:
        raise DataError(f"{where}: no queries with a selected passage")
    log.info("%s: %d pairs", name, written)


def plan(name, split=None, instruction=None, owner=beir.HUB_OWNER):
    """(source name, instruction, where from, rows(max_pairs)) for a SOURCES name, a local BEIR folder
    or another BEIR dataset on the hub."""
    folder = os.path.isdir(name)
    key = os.path.basename(os.path.normpath(name)) if folder else name
    entry = SOURCES.get(key, {})
    instruction = instruction or entry.get("instruction")
    if not instruction:
        raise DataError(f"{key}: no instruction: add it to SOURCES in dataset/qg_training.py, or pass --instruction")
    if "msmarco_qna" in entry and not folder:
        spec = entry["msmarco_qna"]
        return key, instruction, beir.describe(spec), lambda n: msmarco_qna_pairs(spec, instruction, key, n)
    split = split or entry.get("split", "train")
    source = beir.Folder(name) if folder else beir.Hub(key, entry.get("hub") or
                                                       beir.hub_specs(entry.get("beir", key), owner))
    where = {"corpus": source.file("corpus"), "queries": source.file("queries"), "qrels": source.file("qrels", split)}
    return key, instruction, where, lambda n: beir_pairs(source, split, instruction, key, n)


def parts_dir(out):
    return os.path.splitext(out)[0] + ".parts"


def build(names, out=OUT, split=None, max_pairs=None, instruction=None, overwrite=False, owner=beir.HUB_OWNER):
    """Write the SFT rows of the sources `names` to `out` (see the module's docstring); its path."""
    plans = [plan(name, split, instruction, owner) for name in names]
    if len({p[0] for p in plans}) < len(plans):
        raise DataError(f"two sources share a name: {[p[0] for p in plans]}")
    manifest = {}
    for key, text, where, rows in plans:
        part = os.path.join(parts_dir(out), f"{key}.jsonl")
        if overwrite or not os.path.exists(part):
            write_jsonl(rows(max_pairs), part)
        else:
            log.info("%s: reusing %s", key, part)
        manifest[key] = {"from": where, "instruction": text, "max_pairs": max_pairs, "part": part}
    with atomic_open(out) as f:
        for key, entry in manifest.items():
            with open(entry["part"], encoding="utf-8") as part:
                entry["pairs"] = sum(1 for line in part if line.strip())
                part.seek(0)
                shutil.copyfileobj(part, f)
    write_json(manifest, os.path.splitext(out)[0] + ".sources.json")
    log.info("%d pairs from %s -> %s", sum(e["pairs"] for e in manifest.values()), ", ".join(manifest), out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help=f"sources: {', '.join(SOURCES)}, a local BEIR folder, or a BEIR "
                                                 "dataset on the hub (with --instruction)")
    parser.add_argument("--out", default=OUT, help=f"the SFT_DATA file (default {OUT})")
    parser.add_argument("--split", default=None, help="qrels split (default: the source's, else train)")
    parser.add_argument("--max-pairs", type=int, default=None, help="at most this many pairs per source")
    parser.add_argument("--instruction", default=None, help="instruction for every row (default: SOURCES)")
    parser.add_argument("--hub-owner", default=beir.HUB_OWNER)
    parser.add_argument("--overwrite", action="store_true", help="remake the parts already made")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    build(args.names, args.out, args.split, args.max_pairs, args.instruction, args.overwrite, args.hub_owner)
    return 0


if __name__ == "__main__":
    main()
