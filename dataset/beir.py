"""Bring BEIR datasets into the MAIR layout as evaluation tasks (and read the BEIR format for
dataset/qg_training.py). Needs internet for the hub; a local BEIR folder works offline.

    python -m dataset.beir scifact nfcorpus nq             # from the hub: BeIR/<name>, BeIR/<name>-qrels
    python -m dataset.beir path/to/hotpotqa                # an unzipped BEIR folder
    python -m dataset.beir nq --task NQ --split test --overwrite

A BEIR dataset is corpus.jsonl `{"_id", "title", "text"}`, queries.jsonl `{"_id", "text"}` and
qrels/<split>.tsv (`query-id<TAB>corpus-id<TAB>score`, one header line). Each becomes the task
`BEIR-<name>` (or --task) in the layout every script reads:
    MAIR-Docs/<task>/docs.jsonl        {"id", "doc"}: title and text joined by a space, as BEIR's models do
    MAIR-Queries/<task>/queries.jsonl  {"qid", "instruction", "query", "labels": [{"id", "score"}]}, only
                                       the queries of qrels/<split>.tsv, with every judged document (score
                                       0 included: it counts as judged non-relevant)
    MAIR-Docs/<task>/task.json         {"domain": "BEIR", ...}: registers the task (mair_config), so
                                       every script accepts it and the tables count it in the BEIR average
The qrels and the queries of the split are held in memory (small); the corpus (millions of documents
for NQ, HotpotQA, DBPedia, FEVER, Climate-FEVER) is streamed once into docs.jsonl, keeping only its
ids (to name a duplicate's first line and to count labels outside the corpus). Every file is written
under a temporary name and renamed, docs.jsonl last, so a task is on disk only when complete; a task
whose files all exist is skipped (--overwrite redoes it).

Instruction: that of MAIR's copy of the same dataset when its queries file is on disk
(mair_config.BEIR_MAIR_TASK, data.task_instruction), else INSTRUCTIONS below; --instruction wins.
"""
import argparse
import logging
import os

from tqdm import tqdm

import mair_config
from data import task_instruction
from file_io import DataError, iter_lines, iter_rows, write_json, write_jsonl
from prompts import GENERIC_INSTRUCTION

log = logging.getLogger("beir")

# BEIR dataset -> its instruction, used where MAIR's copy of the dataset is not on disk. Edit freely.
INSTRUCTIONS = {
    "msmarco": "Given a web search query, retrieve web passages that answer it.",
    "trec-covid": "Given a question about COVID-19, retrieve scientific articles that answer it.",
    "nfcorpus": "Given a question about nutrition or health, retrieve medical articles relevant to it.",
    "nq": "Given a question, retrieve the Wikipedia passage that answers it.",
    "hotpotqa": "Given a multi-hop question, retrieve the Wikipedia passages that together answer it.",
    "fiqa": "Given a financial question, retrieve forum answers that address it.",
    "arguana": "Given an argument, retrieve the counter-argument that best refutes it.",
    "webis-touche2020": "Given a controversial question, retrieve arguments for or against it.",
    "cqadupstack": "Given a question from a StackExchange forum, retrieve earlier questions it duplicates.",
    "quora": "Given a question, retrieve other questions that ask the same thing.",
    "dbpedia-entity": "Given an entity-seeking query, retrieve the DBpedia entities it asks for.",
    "scidocs": "Given the title of a scientific paper, retrieve abstracts of papers related to it (cited or "
               "read together).",
    "fever": "Given a claim, retrieve the Wikipedia articles with evidence that supports or refutes it.",
    "climate-fever": "Given a claim about climate change, retrieve Wikipedia passages that support or refute it.",
    "scifact": "Given a scientific claim, retrieve the paper abstracts that support or refute it.",
}
HUB_OWNER = "BeIR"
TASK_PREFIX = "BEIR-"
# Field names of the BEIR files (the hub copies keep them): corpus, queries, qrels.
DOC_ID, TITLE, TEXT, QUERY_ID, QUERY = "_id", "title", "text", "_id", "text"
QRELS_QUERY, QRELS_DOC, QRELS_SCORE = "query-id", "corpus-id", "score"


def hub_specs(name, owner=HUB_OWNER):
    """`datasets.load_dataset` arguments of a BEIR dataset on the hub: the files of <owner>/<name>
    (corpus.jsonl.gz, queries.jsonl.gz, read as JSON files: `datasets` >= 4 runs no loading script)
    and <owner>/<name>-qrels/{split}.tsv ({split} is filled in; ids read as text)."""
    base = f"hf://datasets/{owner}/{name}"
    return {"corpus": {"path": "json", "data_files": f"{base}/corpus.jsonl.gz", "split": "train"},
            "queries": {"path": "json", "data_files": f"{base}/queries.jsonl.gz", "split": "train"},
            "qrels": {"path": "csv", "data_files": f"{base}-qrels/{{split}}.tsv", "split": "train", "delimiter": "\t",
                      "quoting": 3, "features": {QRELS_QUERY: "string", QRELS_DOC: "string", QRELS_SCORE: "int64"}}}


def describe(spec):
    """A spec of load_rows in a few words, for messages."""
    files = spec.get("data_files")
    return str(files) if files else " ".join(str(spec[k]) for k in ("path", "name", "split") if spec.get(k))


def load_rows(spec):
    """Stream the rows (dicts) of `spec`: keyword arguments of datasets.load_dataset, "features" given as
    {column: dtype name}. The one place that touches the hub (tests replace it)."""
    from datasets import Features, Value, load_dataset

    spec = dict(spec)
    if spec.get("features"):
        spec["features"] = Features({column: Value(dtype) for column, dtype in spec["features"].items()})
    try:
        return iter(load_dataset(**spec, streaming=True))
    except Exception as e:  # the hub's errors vary by version: name the file and the cause
        raise DataError(f"{describe(spec)}: cannot load ({type(e).__name__}: {e})") from e


class Folder:
    """A BEIR dataset on disk: corpus.jsonl, queries.jsonl, qrels/<split>.tsv. The readers yield
    (physical line, row); at(kind, n) names the place."""

    def __init__(self, path):
        self.path, self.name = path, os.path.basename(os.path.normpath(path))
        for kind in ("corpus", "queries"):
            if not os.path.isfile(self.file(kind)):
                raise DataError(f"{path}: not a BEIR folder: no {kind}.jsonl")

    def file(self, kind, split=None):
        """The file of `kind` ("corpus", "queries" or "qrels" of `split`)."""
        return os.path.join(self.path, "qrels", f"{split}.tsv") if kind == "qrels" else \
            os.path.join(self.path, f"{kind}.jsonl")

    def at(self, kind, n, split=None):
        return f"{self.file(kind, split)}:{n}"

    def corpus(self):
        return iter_rows(self.file("corpus"), (DOC_ID,))

    def queries(self):
        return iter_rows(self.file("queries"), (QUERY_ID,))

    def qrels(self, split):
        """(line, query id, doc id, score) of qrels/<split>.tsv, its header line skipped."""
        path = self.file("qrels", split)
        if not os.path.isfile(path):
            folder = os.path.dirname(path)
            have = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".tsv")) if os.path.isdir(folder) else []
            raise DataError(f"{path}: no such file, so no '{split}' qrels (splits here: {', '.join(have) or 'none'})")
        for n, line in iter_lines(path):
            cols = line.rstrip("\r\n").split("\t")
            if cols[:2] == [QRELS_QUERY, QRELS_DOC]:
                continue
            if len(cols) != 3:
                raise DataError(f"{path}:{n}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                                f"got {len(cols)}")
            yield n, cols[0], cols[1], _score(cols[2], path, n)


class Hub:
    """A dataset with a corpus, queries and qrels on the Hugging Face hub in BEIR's field names;
    `specs`: {"corpus", "queries", "qrels"} -> load_rows specs ("{split}" in a qrels value is filled in)."""

    def __init__(self, name, specs):
        self.name, self.specs = name, specs

    def spec(self, kind, split=None):
        return {k: v.format(split=split) if isinstance(v, str) else v for k, v in self.specs[kind].items()}

    def file(self, kind, split=None):
        return describe(self.spec(kind, split))

    def at(self, kind, n, split=None):
        return f"{self.file(kind, split)} row {n}"

    def _rows(self, kind, field):
        for n, row in enumerate(load_rows(self.spec(kind)), 1):
            if field not in row:
                raise DataError(f"{self.at(kind, n)}: missing field '{field}'")
            yield n, row

    def corpus(self):
        return self._rows("corpus", DOC_ID)

    def queries(self):
        return self._rows("queries", QUERY_ID)

    def qrels(self, split):
        for n, row in enumerate(load_rows(self.spec("qrels", split)), 1):
            where = self.at("qrels", n, split)
            if QRELS_QUERY not in row or QRELS_DOC not in row:
                raise DataError(f"{where}: needs fields '{QRELS_QUERY}' and '{QRELS_DOC}'")
            yield n, str(row[QRELS_QUERY]), str(row[QRELS_DOC]), _score(row.get(QRELS_SCORE, 1), where, None)


def _score(value, where, n):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}{'' if n is None else f':{n}'}: score {value!r} is not an integer") from None


def open_source(name_or_path, owner=HUB_OWNER):
    """A local BEIR folder (an existing directory) or the hub copy of the BEIR dataset `name`."""
    if os.path.isdir(name_or_path):
        return Folder(name_or_path)
    return Hub(name_or_path, hub_specs(name_or_path, owner))


def doc_text(row):
    """A BEIR document as one text: title and text joined by a space, stripped (BEIR's own convention)."""
    return f"{row.get(TITLE) or ''} {row.get(TEXT) or ''}".strip()


def read_qrels(source, split):
    """{query id: {doc id: score}} of the split (a repeated pair keeps its highest score); none is an error."""
    qrels = {}
    for _, qid, doc, score in tqdm(source.qrels(split), desc=f"{source.name}: {split} qrels", unit=" pairs",
                                   dynamic_ncols=True):
        qrels.setdefault(qid, {})[doc] = max(score, qrels.get(qid, {}).get(doc, score))
    if not qrels:
        raise DataError(f"{source.file('qrels', split)}: no qrels")
    return qrels


def instruction_for(name, root=None, override=None):
    """The task instruction of BEIR dataset `name` (see the module's docstring)."""
    if override:
        return override
    twin = mair_config.BEIR_MAIR_TASK.get(name)
    if twin and os.path.exists(mair_config.queries_path(twin, root)):
        text = task_instruction(mair_config.docs_path(twin, root))
        if text != GENERIC_INSTRUCTION:
            log.info("%s: the instruction of MAIR's %s", name, twin)
            return text
    if name in INSTRUCTIONS:
        return INSTRUCTIONS[name]
    raise DataError(f"{name}: no instruction: add a line for it to INSTRUCTIONS in dataset/beir.py, or pass "
                    "--instruction")


def eval_queries(source, qrels, instruction):
    """The MAIR query rows of the queries in `qrels`, in the queries file's order (a repeated query id
    keeps its first row)."""
    rows, empty, pending = [], 0, dict(qrels)
    for _, q in tqdm(source.queries(), desc=f"{source.name}: queries", unit=" queries", dynamic_ncols=True):
        rels = pending.pop(str(q[QUERY_ID]), None)
        if rels is not None:
            text = q.get(QUERY) or ""
            empty += not text.strip()
            rows.append({"qid": str(q[QUERY_ID]), "instruction": instruction, "query": text,
                         "labels": [{"id": d, "score": s} for d, s in rels.items()]})
    if not rows:
        raise DataError(f"{source.file('queries')}: none of the {len(qrels)} queries of the qrels is in it")
    if pending:
        log.warning("%s: %d queries of the qrels are not in %s, left out (e.g. %s)", source.name, len(pending),
                    source.file("queries"), ", ".join(list(pending)[:3]))
    if empty:
        log.warning("%s: %d queries with empty text (they score 0)", source.name, empty)
    return rows


def corpus_docs(source, seen):
    """Stream the corpus as {"id", "doc"} rows, filling `seen` {id: line}; a duplicate id is an error
    naming both places, documents with empty text are warned about at the end."""
    empty = []
    for n, row in tqdm(source.corpus(), desc=f"{source.name}: corpus", unit=" docs", dynamic_ncols=True):
        doc_id = str(row[DOC_ID])
        if doc_id in seen:
            raise DataError(f"{source.at('corpus', n)}: duplicate document id '{doc_id}' (first at "
                            f"{source.at('corpus', seen[doc_id])})")
        seen[doc_id] = n
        text = doc_text(row)
        if not text:
            empty.append(n)
        yield {"id": doc_id, "doc": text}
    if not seen:
        raise DataError(f"{source.file('corpus')}: empty corpus")
    if empty:
        log.warning("%s: %d document(s) with empty text, e.g. %s", source.name, len(empty),
                    ", ".join(source.at("corpus", n) for n in empty[:3]))


def convert(source, task, instruction, root=None, split="test", overwrite=False):
    """Write `source` (a Folder or Hub) as the evaluation task `task` under `root`; the paths written."""
    docs, queries, spec = mair_config.docs_path(task, root), mair_config.queries_path(task, root), \
        mair_config.task_file(task, root)
    if not overwrite and all(os.path.exists(p) for p in (docs, queries, spec)):
        log.info("%s: already converted (%s), skipped", task, docs)
        return []
    qrels = read_qrels(source, split)
    labelled = {d for rels in qrels.values() for d in rels}
    rows = eval_queries(source, qrels, instruction)
    write_json({"domain": mair_config.BEIR_DOMAIN, "beir": source.name, "split": split,
                "from": source.file("corpus"), "qrels": source.file("qrels", split)}, spec)
    write_jsonl(rows, queries)
    seen = {}
    write_jsonl(corpus_docs(source, seen), docs)
    unknown = len(labelled - seen.keys())
    if unknown:
        log.warning("%s: %d of %d judged documents are not in the corpus (they count as not retrieved)", task,
                    unknown, len(labelled))
    log.info("%s: %d documents, %d queries -> %s", task, len(seen), len(rows), os.path.dirname(queries))
    return [spec, queries, docs]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help="BEIR dataset names (hub) or local BEIR folders")
    parser.add_argument("--split", default="test", help="qrels split to evaluate on (default test)")
    parser.add_argument("--task", help="task name (one dataset only; default BEIR-<name>)")
    parser.add_argument("--instruction", help="instruction for every query (default: see INSTRUCTIONS)")
    parser.add_argument("--hub-owner", default=HUB_OWNER)
    parser.add_argument("--root", default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.task and len(args.names) > 1:
        parser.error("--task names one dataset")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in args.names:
        source = open_source(name, args.hub_owner)
        convert(source, args.task or TASK_PREFIX + source.name,
                instruction_for(source.name, args.root, args.instruction), args.root, args.split, args.overwrite)
    return 0


if __name__ == "__main__":
    main()
