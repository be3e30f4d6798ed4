"""Sharded, resumable document-level generation shared by qg_vllm.py and title_vllm.py.

A shard is the documents `docs[pid::total_num]`. Its rows are appended, a chunk at a time, to
`<shard>.partial` and renamed to the shard file only when every document is done, so a killed
run resumes where it stopped and a shard file on disk is always complete. The launcher
(`-total_num 0`) starts one process per GPU for each corpus, waits, and merges the shards into
the final file only when all of them are present and cover exactly their documents.
"""
import glob
import json
import logging
import os
import re
import subprocess
import sys
import time

from tqdm.auto import tqdm

import mair_config
from file_io import DataError, add_jsonl, iter_jsonl, read_jsonl, require_fields, write_jsonl
from prompts import GENERIC_INSTRUCTION

log = logging.getLogger("shards")


# The original single-dash flags of the generation scripts: (name, type, default).
GEN_FLAGS = [("docs_path", str, ""), ("data_name", str, ""), ("pid", int, 0), ("total_num", int, 0),
             ("model_sufix", str, None), ("model_name", str, None), ("num_q", int, None)]


class IncompleteShards(RuntimeError):
    pass


def load_generator(model_name, C, pid=0):
    """(generator backend, tokenizer) for a shard process."""
    import lm

    tokenizer = lm.load_tokenizer(model_name)
    generator = lm.make_generator(model_name, backend=C["BACKEND"], batch_size=C["BATCH_SIZE"], seed=C["SEED"] + pid,
                                  gpu_memory_utilization=C["GPU_MEMORY_UTILIZATION"])
    return generator, tokenizer


def chat_ids_for(tokenizer, prompt):
    import lm
    return lm.chat_prompt_ids(tokenizer, prompt)


def prepare_docs(tokenizer, docs, C):
    """Documents cut as in the original: first DOC_WORDS words, then at most DOC_TOKENS tokens."""
    import lm
    return [{**d, "prepared": lm.truncate_tokens(tokenizer, lm.truncate_words(d["doc"], C["DOC_WORDS"]),
                                                 C["DOC_TOKENS"])} for d in docs]


def read_docs(docs_path):
    """Documents of a docs.jsonl, validated: missing fields and duplicate ids are errors, empty texts warned."""
    docs, seen, empty = [], {}, []
    for lineno, row in enumerate(iter_jsonl(docs_path), 1):
        require_fields(row, ("id", "doc"), docs_path, lineno)
        doc_id = str(row["id"])
        if doc_id in seen:
            raise DataError(f"{docs_path}:{lineno}: duplicate document id '{doc_id}' (first on line {seen[doc_id]})")
        seen[doc_id] = lineno
        text = row["doc"] if isinstance(row["doc"], str) else ""
        if not text.strip():
            empty.append(f"{doc_id} (line {lineno})")
        docs.append({"id": doc_id, "doc": text})
    if not docs:
        raise DataError(f"{docs_path}: empty corpus")
    if empty:
        log.warning("%s: %d document(s) with empty text, e.g. %s", docs_path, len(empty), ", ".join(empty[:3]))
    return docs


def task_instruction(docs_path):
    """The task's instruction from its queries file (next to the docs in the MAIR layout), as in the
    original: a generic one when the first and last queries' instructions differ or the file is missing."""
    queries_path = docs_path.replace("MAIR-Docs", "MAIR-Queries").replace("docs.jsonl", "queries.jsonl")
    if not os.path.exists(queries_path):
        log.warning("%s: no queries file at %s; using the generic instruction", docs_path, queries_path)
        return GENERIC_INSTRUCTION
    rows = read_jsonl(queries_path)
    if not rows:
        return GENERIC_INSTRUCTION
    first, last = rows[0].get("instruction") or "", rows[-1].get("instruction") or ""
    if first != last or not first:
        log.info("%s: instructions differ across queries; using the generic instruction", queries_path)
        return GENERIC_INSTRUCTION
    return first


def shard_docs(docs, pid, total_num):
    if not 0 <= pid < total_num:
        raise ValueError(f"-pid {pid} is outside 0..{total_num - 1} (-total_num {total_num})")
    return docs[pid::total_num]


def _load_partial(partial, per_doc, doc_key):
    """Rows already generated, grouped by document; documents with fewer than `per_doc` rows and a
    line cut by a kill are dropped."""
    done = {}
    if not os.path.exists(partial):
        return done
    with open(partial, encoding="utf-8") as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):
                log.warning("%s: dropping a cut last line (killed run)", partial)
                break
            raise DataError(f"{partial}:{lineno}: malformed line") from None
        done.setdefault(doc_key(row), []).append(row)
    return {k: v for k, v in done.items() if len(v) == per_doc}


def generate_shard(docs, out_path, generate_chunk, per_doc, doc_key, chunk_size=256, desc="shard"):
    """Run `generate_chunk(docs) -> rows` over `docs`, resumable; write `out_path` when complete."""
    partial = out_path + ".partial"
    done = _load_partial(partial, per_doc, doc_key)
    ids = {d["id"] for d in docs}
    done = {k: v for k, v in done.items() if k in ids}
    write_jsonl((row for d in docs if d["id"] in done for row in done[d["id"]]), partial)
    todo = [d for d in docs if d["id"] not in done]
    if done:
        log.info("%s: resuming, %d of %d documents already done", desc, len(done), len(docs))
    for start in tqdm(range(0, len(todo), chunk_size), desc=desc, dynamic_ncols=True):
        chunk = todo[start:start + chunk_size]
        rows = generate_chunk(chunk)
        by_doc = {}
        for row in rows:
            by_doc.setdefault(doc_key(row), []).append(row)
        for d in chunk:
            if len(by_doc.get(d["id"], [])) != per_doc:
                raise RuntimeError(f"{desc}: generator returned {len(by_doc.get(d['id'], []))} rows for "
                                   f"document {d['id']}, expected {per_doc}")
        add_jsonl(rows, partial)
        done.update(by_doc)
    write_jsonl((row for d in docs for row in done[d["id"]]), out_path)
    os.remove(partial)
    log.info("%s: %d rows -> %s", desc, len(docs) * per_doc, out_path)
    return out_path


def merge_shards(final_path, total_num, docs, per_doc, doc_key):
    """Merge `total_num` shards into `final_path`, only when each is present and holds exactly its
    documents with `per_doc` rows each. Shards from another `total_num` are ignored with a warning."""
    stem, ext = os.path.splitext(final_path)
    pattern = re.compile(re.escape(os.path.basename(stem)) + r"-(\d+)-(\d+)" + re.escape(ext) + "$")
    others = [p for p in glob.glob(f"{stem}-*-*{ext}")
              if (m := pattern.search(os.path.basename(p))) and int(m.group(2)) != total_num]
    if others:
        log.warning("ignoring %d shard file(s) from another -total_num: %s", len(others), ", ".join(sorted(others)[:3]))
    paths = [mair_config.shard_path(final_path, pid, total_num) for pid in range(total_num)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise IncompleteShards(f"{final_path}: {len(missing)} of {total_num} shards missing, e.g. {missing[0]}; "
                               "not merged")
    rows = []
    for pid, path in enumerate(paths):
        shard = read_jsonl(path)
        expected = [d["id"] for d in shard_docs(docs, pid, total_num)]
        got = list(dict.fromkeys(doc_key(r) for r in shard))
        if got != expected or len(shard) != per_doc * len(expected):
            raise IncompleteShards(f"{path}: holds {len(got)} documents / {len(shard)} rows, expected "
                                   f"{len(expected)} documents x {per_doc}; not merged (stale or from other data?)")
        rows.extend(shard)
    write_jsonl(rows, final_path)
    log.info("merged %d shards (%d rows) -> %s", total_num, len(rows), final_path)
    return final_path


def default_total_num():
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def launch(script, corpora, total_num, child_args, final_path, docs_path, per_doc, doc_key, log_dir="log"):
    """For each corpus: skip if merged, else run `total_num` shard processes (one GPU each), wait, merge.

    `child_args(corpus)` gives the shard command's flags besides -pid / -total_num. A failing corpus
    is reported and the next one still runs; returns the list of corpora that did not finish.
    """
    import torch

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    failed = []
    for corpus in tqdm(corpora, desc=os.path.basename(script), dynamic_ncols=True):
        final = final_path(corpus)
        if os.path.exists(final):
            log.info("%s: %s exists, skipped", corpus, final)
            continue
        os.makedirs(log_dir, exist_ok=True)
        procs, started = [], time.time()
        for pid in range(total_num):
            env = dict(os.environ)
            if n_gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(pid % n_gpus)
            else:
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // total_num)))
            cmd = [sys.executable, script, "-pid", str(pid), "-total_num", str(total_num), *child_args(corpus)]
            log_path = os.path.join(log_dir, f"{os.path.basename(script)[:-3]}-{corpus}-{pid}.log")
            log.info("%s shard %d/%d -> log %s", corpus, pid, total_num, log_path)
            with open(log_path, "w") as log_file:
                procs.append((subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT), log_path))
        codes = [(p.wait(), path) for p, path in procs]
        bad = [path for code, path in codes if code != 0]
        if bad:
            log.error("%s: %d shard process(es) failed, see %s", corpus, len(bad), ", ".join(bad))
            failed.append(corpus)
            continue
        try:
            merge_shards(final, total_num, read_docs(docs_path(corpus)), per_doc, doc_key)
        except (IncompleteShards, DataError) as e:
            log.error("%s: %s", corpus, e)
            failed.append(corpus)
            continue
        log.info("%s: done in %.0f s", corpus, time.time() - started)
    return failed


def launch_all(script, C, args, final_path, per_doc, doc_key):
    """Launcher mode of a generation script: every corpus of C["TASKS"], C["TOTAL_NUM"] shards each."""
    corpora = mair_config.corpora_of(C["TASKS"])
    total = C["TOTAL_NUM"] or default_total_num()
    docs_path = lambda corpus: mair_config.corpus_docs_path(corpus, C["DATA_ROOT"])  # noqa: E731
    missing = [c for c in corpora if not os.path.exists(docs_path(c))]
    for corpus in missing:
        log.error("%s: no documents at %s; skipped", corpus, docs_path(corpus))
    ready = [c for c in corpora if c not in missing]

    def child_args(corpus):
        return ["-docs_path", docs_path(corpus), "-data_name", corpus, "-model_sufix", C["MODEL_SUFIX"],
                "-model_name", C["MODEL_NAME"], "-num_q", str(C["NUM_Q"]), *args.passthrough]

    log.info("%s: %d corpora x %d shards", os.path.basename(script), len(ready), total)
    failed = missing + launch(script, ready, total, child_args, final_path, docs_path, per_doc, doc_key,
                              C["LOG_DIR"])
    if failed:
        log.error("not finished: %s (rerun to resume)", ", ".join(failed))
    return failed
