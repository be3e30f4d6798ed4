"""Download MAIR tasks from the Hugging Face hub (MAIR-Bench/MAIR-Queries, MAIR-Bench/MAIR-Docs)
into the layout every script reads. Needs internet; the conversion itself is offline and tested.

    python -m dataset.download_mair --tasks SciFact NFCorpus      # some tasks
    python -m dataset.download_mair --domain Medical              # a domain
    python -m dataset.download_mair --all                         # all 126 tasks

A task's main split (`queries` / `docs`) becomes `MAIR-Queries/<task>/queries.jsonl` and
`MAIR-Docs/<task>/docs.jsonl`; a task with further splits (`X_queries` / `X_docs`) gets
`X_queries.jsonl` / `X_docs.jsonl` beside them (the pipeline reads the main split).
"""
import argparse
import logging
import os

from tqdm import tqdm

import mair_config
from file_io import DataError, write_jsonl

log = logging.getLogger("download_mair")

QUERIES_REPO, DOCS_REPO = "MAIR-Bench/MAIR-Queries", "MAIR-Bench/MAIR-Docs"


def _rows(split_rows, source, kind):
    """Validate and normalise rows (ids as strings) of one split."""
    for i, row in enumerate(split_rows):
        where = f"{source}[{i}]"
        if kind == "docs":
            if "id" not in row or "doc" not in row:
                raise DataError(f"{where}: a document needs fields 'id' and 'doc'")
            yield {"id": str(row["id"]), "doc": row["doc"] or ""}
        else:
            for field in ("qid", "query", "labels"):
                if field not in row:
                    raise DataError(f"{where}: missing field '{field}'")
            labels = [{"id": str(lab["id"]), "score": int(lab.get("score", 1))} for lab in row["labels"]]
            yield {"qid": str(row["qid"]), "instruction": row.get("instruction") or "",
                   "query": row["query"], "labels": labels}


def split_file(task, split, kind, root=None):
    """Output path of one split: the main split maps to the standard layout."""
    main = mair_config.queries_path(task, root) if kind == "queries" else mair_config.docs_path(task, root)
    if split == kind:
        return main
    return os.path.join(os.path.dirname(main), f"{split}.jsonl")


def save_task(task, queries, docs, root=None):
    """Write one task's splits from two mappings split name -> rows (e.g. `datasets.DatasetDict`)."""
    written = []
    for kind, splits in (("queries", queries), ("docs", docs)):
        if kind not in splits:
            raise DataError(f"{task}: no '{kind}' split (found {sorted(splits)})")
        for split in sorted(splits):
            path = split_file(task, split, kind, root)
            write_jsonl(_rows(splits[split], f"{task}/{split}", kind), path)
            written.append(path)
    return written


def download(tasks, root=None, overwrite=False):
    from datasets import load_dataset

    for task in tqdm(tasks, desc="MAIR tasks"):
        mair_config.check_task(task)
        if not overwrite and os.path.exists(mair_config.docs_path(task, root)) \
                and os.path.exists(mair_config.queries_path(task, root)):
            log.info("%s: already downloaded, skipped", task)
            continue
        queries = load_dataset(QUERIES_REPO, task)
        docs = load_dataset(DOCS_REPO, task)
        for path in save_task(task, queries, docs, root):
            log.info("%s -> %s", task, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--tasks", nargs="+")
    group.add_argument("--domain")
    group.add_argument("--all", action="store_true")
    parser.add_argument("--root", default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.all:
        tasks = mair_config.get_all_tasks()
    elif args.domain:
        tasks = mair_config.get_tasks_by_domain(args.domain)
    else:
        tasks = args.tasks
    download(tasks, args.root, args.overwrite)


if __name__ == "__main__":
    main()
