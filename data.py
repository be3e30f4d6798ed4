"""Reading the pipeline's inputs and building its training rows: corpora (docs.jsonl), a task's
instruction, queries and qrels from its queries file, DocID files, and the rows the models learn
from (the two SFT sets, document-as-query passages).

The ground floor under the scripts: it imports only file_io, mair_config, prompts, docids and the
standard library.
"""
import logging
import os
import random
import re

import mair_config
from docids import ExtractiveTeacher, normalize_docid
from file_io import DataError, is_blank, iter_rows, read_rows, warn_skipped
from prompts import DOCID_RULES, GENERIC_INSTRUCTION

log = logging.getLogger("data")

N_EXAMPLES = 5                # unknown-label examples kept in a qrels report
DOCASQ_MODES = ("random", "leading", "none")  # DOCASQ_MODE: DOCASQ_N seeded windows, the first words, no passage


# ----------------------------------------------------------------------------- corpora

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


# ----------------------------------------------------------------------------- DocIDs

def docid_warnings(path, unknown, missing, n_docs, examples):
    """The warnings of a DocID file that names `unknown` ids outside the corpus and misses `missing`
    of its `n_docs` documents (`examples`: some of their ids)."""
    return [text for text, count in (
        (f"{path}: {unknown} DocIDs for documents not in the corpus, ignored", unknown),
        (f"{path}: {missing} of {n_docs} documents have no DocID and cannot be retrieved, e.g. "
         f"{', '.join(examples[:3])}", missing)) if count]


def load_docids(path, docs, corpus):
    """({doc id: DocID text}, warnings) of the DocID file at `path` (JSONL {"id", "gist"}) over the
    documents `docs` of `corpus`; documents without a DocID are counted and left out, DocIDs of
    unknown documents ignored (both warned about). No file is a DataError."""
    if not os.path.exists(path):
        raise DataError(f"{corpus}: no DocIDs at {path} (run title_vllm.py first)")
    known = {d["id"] for d in docs}
    gists, unknown = {}, 0
    for row in read_rows(path, ("id", "gist")):
        if str(row["id"]) in known:
            gists[str(row["id"])] = row["gist"]
        else:
            unknown += 1
    missing = [d["id"] for d in docs if not str(gists.get(d["id"], "")).strip()]
    warnings = docid_warnings(path, unknown, len(missing), len(docs), missing)
    for w in warnings:
        log.warning(w)
    return {k: v for k, v in gists.items() if v.strip()}, warnings


# ----------------------------------------------------------------------------- queries and qrels

def qrels_from_queries(queries, doc_ids=None, source=None, lines=None, drop_no_relevant=False):
    """Qrels {qid: {doc_id: int score}} from MAIR query rows, and a report of data problems.

    Labels with score <= 0 stay as judged non-relevant (as in trec_eval). If `doc_ids` (the corpus
    ids) is given, labels naming documents missing from the corpus are counted and logged; they
    stay in the qrels, so such queries count against recall and the report says how many.
    Queries with empty text or no relevant label are kept and counted too; with `drop_no_relevant`
    (the BEIR convention) the latter leave the qrels, so no average counts them. `lines` (the physical
    line of each row in `source`) lets errors name the line rather than the row number.
    """
    source = source or "queries"
    known = set(doc_ids) if doc_ids is not None else None
    qrels, unknown_examples = {}, []
    report = {"source": source, "queries": 0, "labels": 0, "empty_query": 0, "no_relevant": 0,
              "unknown_labels": 0, "all_labels_unknown": 0, "unknown_examples": unknown_examples}
    for i, row in enumerate(queries):
        where = f"{source}:{lines[i]}" if lines else f"{source}: query row {i}"
        if "qid" not in row or "labels" not in row:
            raise DataError(f"{where}: missing field 'qid' or 'labels'")
        qid = str(row["qid"])
        if qid in qrels:
            raise DataError(f"{where}: duplicate qid '{qid}'")
        rels = {}
        for label in row["labels"]:
            try:
                doc, score = str(label["id"]), int(label["score"])
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{where}: label {label!r} needs an 'id' and an integer 'score'") from None
            rels[doc] = max(score, rels.get(doc, score))
        qrels[qid] = rels
        report["queries"] += 1
        report["labels"] += len(rels)
        report["empty_query"] += not str(row.get("query") or "").strip()
        report["no_relevant"] += not any(s > 0 for s in rels.values())
        if known is not None:
            unknown = [d for d in rels if d not in known]
            report["unknown_labels"] += len(unknown)
            report["all_labels_unknown"] += bool(rels) and len(unknown) == len(rels)
            unknown_examples.extend(f"{qid} -> {d}" for d in unknown[:N_EXAMPLES - len(unknown_examples)])
    if report["unknown_labels"]:
        log.warning("%s: %d of %d labels name documents missing from the corpus (%d queries have "
                    "no known label); kept, they count as not retrieved. e.g. %s", source,
                    report["unknown_labels"], report["labels"], report["all_labels_unknown"],
                    ", ".join(unknown_examples))
    if report["empty_query"]:
        log.warning("%s: %d queries have empty text", source, report["empty_query"])
    if report["no_relevant"]:
        log.warning("%s: %d queries have no relevant label; %s", source, report["no_relevant"],
                    "left out of the qrels" if drop_no_relevant else "they score 0")
    if drop_no_relevant:
        qrels = {qid: rels for qid, rels in qrels.items() if any(s > 0 for s in rels.values())}
    report["no_relevant_dropped"] = report["no_relevant"] if drop_no_relevant else 0
    return qrels, report


def eval_queries(path, doc_ids, drop_no_relevant):
    """(queries to decode, qrels, qrels report) of the queries file at `path` over the corpus ids
    `doc_ids`; empty queries stay in the qrels (they score 0), and so do queries with no relevant
    label unless `drop_no_relevant`. No query left to evaluate is a DataError."""
    numbered = list(iter_rows(path, ("qid", "query", "labels")))
    rows = [row for _, row in numbered]
    qrels, report = qrels_from_queries(rows, doc_ids, source=path, lines=[n for n, _ in numbered],
                                       drop_no_relevant=drop_no_relevant)
    if not qrels:
        raise DataError(f"{path}: no query to evaluate "
                        f"({report['no_relevant_dropped']} without a relevant label left out)")
    decodable = [q for q in rows if str(q["query"]).strip() and str(q["qid"]) in qrels]
    return decodable, qrels, report


# ----------------------------------------------------------------------------- training rows

def window_start(words, span, rng):
    """A random start of a `span`-word window in `words` (random.Random `rng`)."""
    return rng.randrange(max(1, len(words) - span + 1))


def docasq_rows(docs, instruction, n, span, seed, mode):
    """Document-as-query examples, streamed: passages of `span` words cut from each document; DOCASQ_MODE
    `mode` "random": `n` seeded random windows (a short document gives fewer, distinct passages),
    "leading": one, its first words."""
    if mode not in ("random", "leading"):
        raise ValueError(f"DOCASQ_MODE={mode!r} makes no document-as-query passage (random or leading do)")
    rng = random.Random(seed)
    for d in docs:
        words = d["doc"].split()
        if not words:
            continue
        starts = [0] if mode == "leading" else sorted({window_start(words, span, rng) for _ in range(n)})
        for s in starts:
            yield {"instruction": instruction, "query": " ".join(words[s:s + span]),
                   "labels": [{"id": d["id"], "score": 1}]}


def query_sft_rows(tasks, root):
    """The query generator's SFT rows {"instruction", "query", "doc", "source": task} from the training
    tasks' real queries and their relevant documents; queries with empty text and labels of empty
    documents are skipped with a warning."""
    rows, missing = [], 0
    for task in tasks:
        mair_config.check_task(task, root)
        docs_file, queries_file = mair_config.docs_path(task, root), mair_config.queries_path(task, root)
        if not (os.path.exists(docs_file) and os.path.exists(queries_file)):
            log.warning("%s: missing %s or %s; task skipped", task, docs_file, queries_file)
            continue
        docs = {d["id"]: d["doc"] for d in read_docs(docs_file)}
        empty_query, empty_doc = [], []
        for lineno, q in iter_rows(queries_file, ("query", "labels")):
            if is_blank(q["query"]):
                empty_query.append(lineno)
                continue
            for label in q["labels"]:
                if int(label.get("score", 1)) <= 0:
                    continue
                doc = docs.get(str(label["id"]))
                if doc is None:
                    missing += 1
                elif not doc.strip():
                    empty_doc.append(lineno)
                else:
                    rows.append({"instruction": q.get("instruction") or "", "query": q["query"], "doc": doc,
                                 "source": task})
        warn_skipped(queries_file, empty_query, "row(s) with an empty query")
        warn_skipped(queries_file, empty_doc, "label(s) of an empty document")
    if missing:
        log.warning("%d labels point to documents missing from their corpus; skipped", missing)
    return rows


def dataset_key(name):
    """A dataset or task name compared loosely: its last path part, lower case, letters and digits
    only, without a "beir" prefix ("BeIR/scifact", "BEIR-scifact" and "SciFact" are one dataset)."""
    key = re.sub(r"[^0-9a-z]", "", str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower())
    return key[4:] if key.startswith("beir") and len(key) > 4 else key


def query_key(text):
    """Query text compared with case and spacing ignored."""
    return " ".join(str(text).split()).casefold()


def eval_overlap(rows, where, eval_tasks, root, allow=False):
    """Check query-generator SFT rows against the tasks evaluated later: a row whose "source" is one of
    `eval_tasks` (dataset_key; a BEIR name counts as the MAIR task carrying it, see
    mair_config.BEIR_MAIR_TASK) or whose query equals one of their queries (query_key) is evaluation
    data. `rows`: (line, row) pairs of the SFT data `where`; the tasks' queries are read under `root`
    (a task without a queries file is warned about and compared by name only). Returns the number of
    such rows: a DataError naming the first one's line and task, or with `allow` a warning."""
    if not eval_tasks:
        return 0
    names = {dataset_key(task): task for task in eval_tasks}
    names.update({dataset_key(beir): task for beir, task in mair_config.BEIR_MAIR_TASK.items() if task in eval_tasks})
    queries = {}
    for task in eval_tasks:
        path = mair_config.queries_path(task, root)
        if not os.path.exists(path):
            log.warning("%s: no queries at %s, so SFT queries are not compared with this evaluation task's",
                        task, path)
            continue
        for _, q in iter_rows(path, ("query",)):
            if not is_blank(q["query"]):
                queries.setdefault(query_key(q["query"]), task)
    lines, first, n = [], None, 0
    for n, (lineno, row) in enumerate(rows, 1):
        source = row.get("source")
        task = names.get(dataset_key(source)) if not is_blank(source) else None
        why = f"its source '{source}' is the evaluation task {task}" if task else None
        if task is None and not is_blank(row.get("query")):
            task = queries.get(query_key(row["query"]))
            why = f"its query {row['query']!r} is a query of the evaluation task {task}"
        if task is not None:
            lines.append(lineno)
            first = first or f"{where}:{lineno}: SFT row of evaluation data: {why}"
    if not lines:
        return 0
    shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
    message = (f"{first}. {len(lines)} of {n} rows are evaluation data (line {shown}); the query generator must "
               f"not train on the tasks of EVAL_TASKS ({', '.join(eval_tasks)})")
    if not allow:
        raise DataError(message + ": remove those rows, or set ALLOW_EVAL_OVERLAP to train on them anyway")
    log.warning("%s; training on them anyway (ALLOW_EVAL_OVERLAP)", message)
    return len(lines)


def load_teacher(path):
    """{(task, id) or id: DocID} from a teacher file."""
    teacher = {}
    for row in read_rows(path, ("id", "gist")):
        key = (row["task"], str(row["id"])) if row.get("task") else str(row["id"])
        teacher[key] = row["gist"]
    return teacher


def docid_sft_rows(tasks, root, teacher_file):
    """The DocID generator's SFT rows {"instruction", "input", "output"} for every document of the
    training tasks: the DocID of `teacher_file` (None: no file) where it has the document, else the
    extractive teacher's."""
    teacher = load_teacher(teacher_file) if teacher_file else {}
    rows, from_file, no_target = [], 0, 0
    for corpus in mair_config.corpora_of(tasks, root):
        path = mair_config.corpus_docs_path(corpus, root)
        if not os.path.exists(path):
            log.warning("%s: no documents at %s; skipped", corpus, path)
            continue
        docs = read_docs(path)
        extractive = ExtractiveTeacher([d["doc"] for d in docs])
        for d in docs:
            if not d["doc"].strip():
                continue  # read_docs warned
            taught = teacher.get((corpus, d["id"])) or teacher.get(d["id"])
            target = normalize_docid(taught) if taught else extractive.docid(d["doc"])
            if target:
                rows.append({"instruction": DOCID_RULES, "input": d["doc"], "output": target})
                from_file += bool(taught)
            else:
                no_target += 1
    log.info("DocID SFT data: %d examples (%d from the teacher file, %d extractive); %d documents without "
             "a DocID skipped", len(rows), from_file, len(rows) - from_file, no_target)
    return rows
