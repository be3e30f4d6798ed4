"""A small evaluation corpus cut from the demo data, for the retriever's tests."""
import mair_config as mc
from docids import ExtractiveTeacher
from file_io import read_jsonl, write_jsonl


def write_small_corpus(root, demo_root, task, docs, num_q=2):
    """`docs` (rows of a demo task) under `root` with the task's queries whose labels are all among
    them, those queries as pseudo-queries (QG-<num_q>, one row per label) and teacher DocIDs for
    every document; returns the teacher."""
    ids = {d["id"] for d in docs}
    queries = [q for q in read_jsonl(mc.queries_path(task, demo_root)) if all(lab["id"] in ids for lab in q["labels"])]
    write_jsonl(docs, mc.docs_path(task, root))
    write_jsonl(queries, mc.queries_path(task, root))
    teacher = ExtractiveTeacher([d["doc"] for d in docs])
    write_jsonl([{"id": d["id"], "gist": teacher.docid(d["doc"])} for d in docs], mc.gist_path(task, root=root))
    write_jsonl([{"instruction": q["instruction"], "query": q["query"], "labels": [lab]} for q in queries
                 for lab in q["labels"]], mc.pseudo_queries_path(task, "QG", num_q, root))
    return teacher
