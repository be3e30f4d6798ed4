"""Sharded, resumable document-level generation shared by qg_vllm.py and title_vllm.py: `run` is
their main and `run_shard` their shard mode; a script supplies only its rows for a chunk of
documents, its output (Output) and its own flags.

A shard is the documents `docs[pid::total_num]`. Its rows are appended, a chunk at a time, to
`<shard>.partial` and renamed to the shard file only when every document is done, so a killed
run resumes where it stopped and a shard file on disk is always complete. The launcher
(`-total_num 0`) runs the shards of every corpus on the visible GPUs (devices.py: one process per
GPU at a time, in waves when there are more shards), skips shard files already on disk, and merges
a corpus's shards into its final file only when all of them are present and cover exactly their
documents. Several nodes on a shared filesystem each run a range of the shards (PID_START..PID_END)
and one merges afterwards (MERGE_ONLY).
"""
import glob
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

import devices
import mair_config
import quality
from data import read_docs
from file_io import DataError, add_jsonl, decode, read_jsonl, write_jsonl

log = logging.getLogger("shards")


# The original single-dash flags of the generation scripts: (name, type, default).
GEN_FLAGS = [("docs_path", str, ""), ("data_name", str, ""), ("pid", int, 0), ("total_num", int, 0),
             ("model_sufix", str, None), ("model_name", str, None), ("num_q", int, None)]


class IncompleteShards(RuntimeError):
    pass


@dataclass
class Generation:
    """How a shard process generates."""
    backend: str                    # auto | vllm | transformers
    batch_size: int                 # prompts per transformers generate call
    seed: int                       # the shard's seed is seed + pid
    gpu_memory_utilization: object  # each vLLM engine's share of GPU memory (None: vLLM's default)
    doc_words: int                  # documents cut to their first words, then tokens
    doc_tokens: int
    chunk_docs: int                 # documents per resumable chunk


@dataclass
class Output:
    """What a generation script writes for a corpus: `per_doc` rows per document, each naming its
    document (`doc_key(row)`), merged into `path(corpus)` with the shard files beside it."""
    path: object
    per_doc: int
    doc_key: object
    figures: object = None          # figures(docs, rows): the output's quality report (quality.py)
    what: str = ""                  # what the rows are, for the report's log line


@dataclass
class Launch:
    """Which shards the launcher runs where."""
    tasks: list
    total_num: int                  # shards per corpus (0: one per visible GPU, 1 on a CPU)
    pid_start: int                  # this node's range of shards, PID_START..PID_END (None: the last)
    pid_end: object
    merge_only: bool
    gpu_memory_utilization: object
    data_root: str
    log_dir: str
    quality_docs: int               # documents whose output rows are scored (quality.py; 0 = all)
    seed: int


def load_generator(model_name, gen, pid=0):
    """(generator backend, tokenizer) for a shard process."""
    import generation
    import lm

    # vLLM must spawn its engine workers: a forked one cannot use CUDA once this process touched it.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    tokenizer = lm.load_tokenizer(model_name)
    generator = generation.make_generator(model_name, backend=gen.backend, batch_size=gen.batch_size,
                                          seed=gen.seed + pid, gpu_memory_utilization=gen.gpu_memory_utilization)
    return generator, tokenizer


def prepare_docs(tokenizer, docs, gen):
    """Documents cut as in the original: first `doc_words` words, then at most `doc_tokens` tokens."""
    import lm
    return [{**d, "prepared": lm.truncate_tokens(tokenizer, lm.truncate_words(d["doc"], gen.doc_words),
                                                 gen.doc_tokens)} for d in docs]


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
    with open(partial, "rb") as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, 1):
        try:  # a kill can also cut a multi-byte character of the last line
            row = json.loads(decode(line, partial, lineno))
        except (json.JSONDecodeError, DataError):
            if lineno == len(lines):
                log.warning("%s: dropping a cut last line (killed run)", partial)
                break
            raise DataError(f"{partial}:{lineno}: malformed line") from None
        done.setdefault(doc_key(row), []).append(row)
    return {k: v for k, v in done.items() if len(v) == per_doc}


def check_shard(path, docs, per_doc, doc_key):
    """The rows of a shard file, which must hold exactly `docs`, in order, with `per_doc` rows each."""
    rows = read_jsonl(path)
    expected = [d["id"] for d in docs]
    got = list(dict.fromkeys(doc_key(r) for r in rows))
    if got != expected or len(rows) != per_doc * len(expected):
        raise IncompleteShards(f"{path}: holds {len(got)} documents / {len(rows)} rows, expected {len(expected)} "
                               f"documents x {per_doc}; not merged (stale or from other data? delete it to redo it)")
    return rows


def generate_shard(docs, out_path, generate_chunk, per_doc, doc_key, chunk_size=256, desc="shard"):
    """Run `generate_chunk(docs) -> rows` over `docs`, resumable; write `out_path` when complete.

    Chunks are fixed by position (docs[k * chunk_size:(k + 1) * chunk_size]) and a resumed run keeps
    only whole chunks, so it generates exactly the chunks an uninterrupted run would: with a backend
    that reseeds at each call (generation.HFGenerator) the output is byte-identical. A complete
    `out_path` already on disk is kept (checked against `docs`), never regenerated."""
    if os.path.exists(out_path):
        check_shard(out_path, docs, per_doc, doc_key)
        log.info("%s: %s is complete, kept (delete it to regenerate)", desc, out_path)
        return out_path
    partial = out_path + ".partial"
    found = _load_partial(partial, per_doc, doc_key)
    chunks = [docs[start:start + chunk_size] for start in range(0, len(docs), chunk_size)]
    done = {d["id"]: found[d["id"]] for chunk in chunks if all(d["id"] in found for d in chunk) for d in chunk}
    write_jsonl((row for d in docs if d["id"] in done for row in done[d["id"]]), partial)
    todo = [chunk for chunk in chunks if any(d["id"] not in done for d in chunk)]
    if done:
        log.info("%s: resuming, %d of %d documents already done", desc, len(done), len(docs))
    for chunk in tqdm(todo, desc=desc, dynamic_ncols=True):
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


def run_shard(script, gen, docs, data_name, pid, total_num, model_name, output, chunk_rows, note=""):
    """Shard mode of a generation script: shard `pid` of `total_num` of a corpus's `docs` into its shard
    file of `output`, resumable (generate_shard). `chunk_rows(generator, tokenizer, docs)` gives the rows
    of a chunk of documents, each with the text for its prompt in "prepared"; `note` ends the log line."""
    docs = shard_docs(docs, pid, total_num)
    out = mair_config.shard_path(output.path(data_name), pid, total_num)
    script_log = logging.getLogger(os.path.basename(script)[:-3])
    script_log.info("%s shard %d/%d: %d documents%s -> %s", data_name, pid, total_num, len(docs), note, out)
    generator, tokenizer = load_generator(model_name, gen, pid)

    def chunk(batch):
        return chunk_rows(generator, tokenizer, prepare_docs(tokenizer, batch, gen))

    return generate_shard(docs, out, chunk, output.per_doc, output.doc_key, gen.chunk_docs, desc=f"{data_name} {pid}")


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
    missing = [pid for pid, p in enumerate(paths) if not os.path.exists(p)]
    if missing:
        raise IncompleteShards(f"{final_path}: {len(missing)} of {total_num} shards missing (pid "
                               f"{pid_ranges(missing)}, e.g. {paths[missing[0]]}); not merged")
    rows = [row for pid, path in enumerate(paths)
            for row in check_shard(path, shard_docs(docs, pid, total_num), per_doc, doc_key)]
    write_jsonl(rows, final_path)
    log.info("merged %d shards (%d rows) -> %s", total_num, len(rows), final_path)
    return final_path


def pid_ranges(pids):
    """`[0, 1, 2, 5]` -> "0-2, 5"."""
    runs = []
    for pid in sorted(pids):
        if runs and pid == runs[-1][1] + 1:
            runs[-1][1] = pid
        else:
            runs.append([pid, pid])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def node_pids(total_num, pid_start=0, pid_end=None):
    """The shards one node runs: PID_START..PID_END of TOTAL_NUM, inclusive (PID_END None = the last)."""
    end = total_num - 1 if pid_end is None else pid_end
    if not 0 <= pid_start <= end < total_num:
        raise ValueError(f"PID_START={pid_start}, PID_END={pid_end}: the range must lie within 0..{total_num - 1} "
                         f"(TOTAL_NUM={total_num}) with PID_START <= PID_END")
    return list(range(pid_start, end + 1))


def launch(script, corpora, total_num, pids, slots, child_args, final_path, docs_path, per_doc, doc_key,
           log_dir="log", merge=True):
    """Run shards `pids` of every corpus, one process per slot at a time in a single queue over all
    corpora (slot = a device for CUDA_VISIBLE_DEVICES, or None on CPU); with `merge`, merge a
    corpus as soon as its shards are done.

    Merged corpora and shard files already on disk are skipped, so a rerun resumes and never
    redoes a finished shard. The shard processes end with the launcher (devices.start_child), and
    write to log_dir/<script>-<corpus>-<pid>-<total_num>.log, which a rerun appends to.
    `child_args(corpus)` gives the shard command's flags besides -pid / -total_num. Returns the
    corpora that did not finish.
    """
    name = os.path.basename(script)[:-3]
    todo, failed = {}, set()

    def log_path(corpus, pid):
        return os.path.join(log_dir, f"{name}-{corpus}-{pid}-{total_num}.log")
    for corpus in corpora:
        final = final_path(corpus)
        if os.path.exists(final):
            log.info("%s: %s exists, skipped", corpus, final)
            continue
        on_disk = [pid for pid in pids if os.path.exists(mair_config.shard_path(final, pid, total_num))]
        if on_disk:
            log.info("%s: shard(s) %s already done, kept", corpus, pid_ranges(on_disk))
        todo[corpus] = [pid for pid in pids if pid not in on_disk]

    def finish(corpus):
        if not merge:
            others = sorted(set(range(total_num)) - set(pids))
            log.info("%s: shard(s) %s done here; shard(s) %s belong to other nodes: merge once all are done with "
                     "`%s.py --TOTAL_NUM=%d --MERGE_ONLY=True`", corpus, pid_ranges(pids), pid_ranges(others),
                     name, total_num)
            return
        try:
            merge_shards(final_path(corpus), total_num, read_docs(docs_path(corpus)), per_doc, doc_key)
        except (IncompleteShards, DataError) as e:
            log.error("%s: %s", corpus, e)
            failed.add(corpus)

    jobs = [(corpus, pid) for corpus, corpus_pids in todo.items() for pid in corpus_pids]
    left = {corpus: len(corpus_pids) for corpus, corpus_pids in todo.items()}
    for corpus in [c for c, n in left.items() if n == 0]:
        finish(corpus)
    if not jobs:
        return sorted(failed)
    os.makedirs(log_dir, exist_ok=True)
    gpus = sorted({s for s in slots if s is not None})
    threads = str(max(1, (os.cpu_count() or 1) // min(len(slots), len(jobs))))
    log.info("%d shard process(es), %d at a time on %s; logs: %s/%s-<corpus>-<pid>-%d.log", len(jobs), len(slots),
             f"GPU(s) {', '.join(gpus)}" if gpus else f"CPU ({threads} thread(s) each)", log_dir, name, total_num)
    if len(jobs) > len(slots):
        log.info("%d shards for %d slot(s): about %d waves, each shard starting as a slot frees up", len(jobs),
                 len(slots), -(-len(jobs) // len(slots)))

    def start(job, device):
        corpus, pid = job
        # vLLM's workers must be spawned: a forked worker cannot use CUDA.
        env = {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
        if device is None:
            env.setdefault("OMP_NUM_THREADS", threads)
        else:
            env[devices.ENV] = device
        cmd = [sys.executable, script, "-pid", str(pid), "-total_num", str(total_num), *child_args(corpus)]
        log.info("%s shard %d/%d%s -> %s", corpus, pid, total_num, "" if device is None else f" on GPU {device}",
                 log_path(corpus, pid))
        with open(log_path(corpus, pid), "a") as log_file:  # a rerun appends: the log of a killed run stays
            log_file.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} launcher {os.getpid()}: {' '.join(cmd)}\n")
            log_file.flush()
            return devices.start_child(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)

    started = time.time()
    bar = tqdm(total=len(jobs), desc=name, unit="shard", dynamic_ncols=True)

    def done(job, code):
        corpus, pid = job
        bar.update()
        left[corpus] -= 1
        if code != 0:
            log.error("%s shard %d failed (exit %d), see %s", corpus, pid, code, log_path(corpus, pid))
            failed.add(corpus)
        elif left[corpus] == 0 and corpus not in failed:
            log.info("%s: shards done after %.0f s", corpus, time.time() - started)
            finish(corpus)

    devices.run_in_slots(jobs, slots, start, done)
    bar.close()
    return sorted(failed)


def launch_all(script, run, flags, final_path, per_doc, doc_key):
    """Launcher mode of a generation script: shards PID_START..PID_END of TOTAL_NUM for every corpus
    of the tasks on the visible GPUs, merged here when this node runs them all (or MERGE_ONLY).
    `run`: a Launch; `flags`: the shard command's flags besides -pid -total_num -docs_path -data_name."""
    corpora = mair_config.corpora_of(run.tasks, run.data_root)
    multi_node = run.pid_start != 0 or run.pid_end is not None
    if (multi_node or run.merge_only) and not run.total_num:
        raise SystemExit("PID_START / PID_END / MERGE_ONLY need an explicit TOTAL_NUM, the same on every node")
    try:
        gpus = [] if run.merge_only else devices.visible_devices()
        per_gpu = devices.slots_per_device(run.gpu_memory_utilization)
        total = run.total_num or len(gpus) or 1
        pids = [] if run.merge_only else node_pids(total, run.pid_start, run.pid_end)
    except ValueError as e:
        raise SystemExit(f"{os.path.basename(script)}: {e}") from None
    slots = devices.device_slots(gpus, per_gpu, len(pids))
    docs_path = lambda corpus: mair_config.corpus_docs_path(corpus, run.data_root)  # noqa: E731
    missing = [c for c in corpora if not os.path.exists(docs_path(c))]
    for corpus in missing:
        log.error("%s: no documents at %s; skipped", corpus, docs_path(corpus))
    ready = [c for c in corpora if c not in missing]

    def child_args(corpus):
        return ["-docs_path", docs_path(corpus), "-data_name", corpus, *flags]

    what = "merging only" if run.merge_only else f"shard(s) {pid_ranges(pids)} of {total}"
    log.info("%s: %d corpora, %s", os.path.basename(script), len(ready), what)
    failed = missing + launch(script, ready, total, pids, slots, child_args, final_path, docs_path, per_doc, doc_key,
                              run.log_dir, merge=run.merge_only or len(pids) == total)
    if failed:
        log.error("not finished: %s (rerun to resume)", ", ".join(failed))
    return failed


def run(script, launch_settings, args, shard, output, flags):
    """A generation script's main, after parse_args. Shard mode (-total_num > 0): `shard(docs_path,
    data_name, pid, total_num)`. Launcher mode: every shard of the corpora of TASKS (launch_all), each
    given `flags` (the script's own) and this command line's overrides. Returns the exit status."""
    if args.total_num > 0:
        if not args.docs_path or not args.data_name:
            raise SystemExit("shard mode (-total_num > 0) needs -docs_path and -data_name")
        shard(args.docs_path, args.data_name, args.pid, args.total_num)
        return 0
    failed = launch_all(os.path.abspath(script), launch_settings, [*flags, *args.passthrough],
                        output.path, output.per_doc, output.doc_key)
    if output.figures:
        for corpus in mair_config.corpora_of(launch_settings.tasks, launch_settings.data_root):
            path = output.path(corpus)
            if corpus not in failed and os.path.exists(path):
                docs_path = mair_config.corpus_docs_path(corpus, launch_settings.data_root)
                quality.report_output(path, lambda: read_docs(docs_path), launch_settings.quality_docs,
                                      launch_settings.seed, output.doc_key, output.figures, corpus, output.what)
    return 1 if failed else 0
