"""Step 5: train the generative retriever per corpus, build its prefix tree, decode ranked DocIDs
with reverse-annealed sampling, and evaluate next to BM25; also the decoding ablation and the sweep.

    python genir.py [--config configs/demo.json]            # train + evaluate every task of TASKS
    accelerate launch --num_processes 8 genir.py             # 8 GPUs: DDP training, queries split
    python genir.py --STAGE=ablation                         # decoding ablation on the trained retrievers
    python genir.py --STAGE=sweep                            # the schedule's k, m, T_max at SWEEP's values
    python genir.py --STAGE=table                            # rebuild results.md from finished tasks

Per corpus: MODEL_DIR/<RUN>/<corpus>/ (checkpoints, trie/). Per task: OUT_DIR/<RUN>/<task>/ holds
{bm25,zerogr,zerogr-rerank}.run (TREC), metrics.json, epochs.json (EVAL_EVERY_EPOCH) and the ablation's
and sweep's runs; OUT_DIR/<RUN>/ results.md, ablation.md (+ plots), sweep.md. Finished tasks and runs
are reused on a rerun (delete them to recompute); a failing corpus or task is reported in
OUT_DIR/<RUN>/failures.json (while it stands) and the others go on.
"""
import dataclasses
import logging
import os
import sys
import time

import bm25
import decoding
import lm
import mair_config
import metrics
import quality
import rank_groups
import ranking
import results
import sft
import train_data
import trie_cache
from config import check_choices, check_number_lists, check_positive_int_or_none, declared, env_rank, parse_args, \
    setup_logging
from data import DOCASQ_MODES, eval_queries, load_docids, read_docs
from file_io import write_json
from prompts import retrieval_prompt

C = {
    "BASE_MODEL": "models/Llama-3.2-3B-Instruct",   # ZeroGR-3B (the released code used the 1B model)
    "MODEL_DIR": "models/genir",                    # retrievers: MODEL_DIR/<RUN>/<corpus>
    "OUT_DIR": "out",                               # results: OUT_DIR/<RUN>/
    "RUN": "zerogr",
    "TASKS": [],                                    # evaluation tasks (see README: the paper's lists are unknown)
    "STAGE": "all",                                 # all | train | eval | table | ablation | sweep
    "DATA_ROOT": mair_config.DATA_ROOT,
    # training data
    "QG_SUFIX": "QG",                               # pseudo-queries: MAIR-Data/<QG_SUFIX>-<NUM_Q>/<corpus>
    "NUM_Q": 16,
    "NUM_PSEUDO": None,                             # pseudo-queries trained on per document: None = all (released)
    "DOCASQ_N": 16,                                 # document-as-query passages per document (0: none)
    "DOCASQ_MODE": "random",                        # "random" windows | "leading" | "none" (released: read, not made)
    "DOCASQ_WORDS": 32,                             # words per passage
    "DOCASQ_REDRAW": False,                         # True: "random" passages drawn again each epoch (released: fixed)
    "QUERY_FILTER": None,                           # k: pseudo-queries whose document BM25 ranks in its top k only
    "GIST_TYPE": "title",                           # DocIDs: MAIR-Data/gist_ids/<corpus>/<GIST_TYPE>.jsonl
    # optimisation (the original code's values)
    "LR": 5e-5,
    "WARMUP_RATIO": 0.5,                            # warmup = half an epoch
    "WARMUP_STEPS": None,                           # None: WARMUP_RATIO
    "EPOCHS": 5,
    "MAX_STEPS": None,                              # a budget of optimizer steps instead (None: EPOCHS, as released)
    "EVAL_EVERY_EPOCH": True,                       # evaluate after each epoch but the last (released): epochs.json
    "BATCH_SIZE": 16,                               # per device
    "GRAD_ACCUM": 1,
    "GRAD_CLIP": 1.0,
    "WEIGHT_DECAY": 0.01,                           # AdamW weight decay (0.01: torch's default, as released)
    "PRECISION": "bf16",                            # on CUDA: "bf16" = bf16 weights, AdamW on them (released);
                                                    #   "fp32_autocast" = fp32 weights, bf16 autocast (CPU: fp32)
    "KEEP_CHECKPOINTS": 0,                          # newest epoch checkpoints kept (0 = all, as released)
    "DIST_TIMEOUT": 1800,                           # seconds a rank waits for the others before the launch stops
    "MAX_LEN": 200,
    "MAX_INSTRUCTION_TOKENS": 64,
    "MAX_QUERY_TOKENS": 64,                         # training queries
    "MAX_EVAL_QUERY_TOKENS": 128,
    "MAX_EVAL_INSTRUCTION_TOKENS": None,            # eval prompts: whole instruction (None, released) | first n tokens
    "INSTRUCTION_IN_PROMPT": True,                  # False: retriever prompts (training, evaluation) are the query only
    # ranking loss of the original code: every RANK_EVERY steps, groups of 1 positive + GROUP_SIZE-1
    # BM25 negatives scored by RANK_TOKEN's logit at the last position, RankNet loss
    "RANK_LOSS": True,
    "RANK_EVERY": 8,
    "GROUP_SIZE": 8,
    "RANK_TOKEN": "<|reserved_special_token_0|>",
    "NEGATIVE_DEPTH": 100,
    "RANKNET_MODE": "released",                     # "released": a ranking step of its own, negatives redrawn, short
                                                    #   groups padded; "joint": added to the LM loss, fixed negatives
    # decoding (DESIGN.md 6)
    "DECODE_MODE": "reverse_annealed",
    "K": 100,
    "SLOPE": 10.0,
    "MIDPOINT": 0.1,
    "T_MAX": 1.5,
    "TOP_K": 50,
    "TOP_P": 0.9,
    "NUCLEUS_TEMPERATURE": 1.0,
    "NUM_BEAMS": None,                              # beam mode: None = K beams
    "BEAM_TOKEN_BUDGET": 1 << 17,                   # beam mode: queries x beams x longest prompt per batch
                                                    # (~14 GiB of bf16 KV cache at 3B)
    "DRAWS_PER_ROUND": 1,                           # > 1: faster approximation of the sequential draws
    "MAX_RESULTS": 100,
    "EVAL_BATCH_SIZE": 32,
    "RERANK": True,                                 # also rank the candidates by RANK_TOKEN's logit
    "RERANK_BATCH_SIZE": 512,                       # candidate rows scored together
    "BM25_WITH_INSTRUCTION": False,
    "BM25_STEMMER": None,                           # BM25 (baseline, negatives): unstemmed (None, released) | "english"
    "BM25_POSITIVE_ONLY": False,                    # True: scored documents only (released: zero-score ones last)
    "DROP_NO_POSITIVE": False,                      # True: queries with no relevant label leave the qrels (BEIR)
    "DOCID_COLLISION_WARN": 0.5,                    # warn when more documents than this share their DocID
    "ACC1": "p@1",                                  # "p@1" (the paper's accuracy) | "ndcg@1" (the released code's log)
    "MAIR_AVERAGE": "domains",                      # MAIR avg: mean of domain averages ("domains", paper) | "tasks"
    "ABLATION_MODES": ["greedy", "iterative_greedy", "nucleus", "reverse_annealed", "beam"],
    "SWEEP": {"SLOPE": [2.5, 5.0, 10.0, 20.0, 40.0], "MIDPOINT": [0.02, 0.05, 0.1, 0.2, 0.4],
              "T_MAX": [0.5, 1.0, 1.5, 2.0, 3.0]},  # STAGE=sweep: each value with the others at their setting
    "SEED": 0,
    "LOG_EVERY": 10,
    "WANDB": "disabled",
    "WANDB_PROJECT": "zerogr",
}

METHODS = {"bm25": "BM25", "zerogr": "ZeroGR", "zerogr-rerank": "ZeroGR (reranked)"}
log = logging.getLogger("genir")


# ---------------------------------------------------------------------------------------------- training

def run_dir():
    return os.path.join(C["OUT_DIR"], C["RUN"])


def model_dir(corpus):
    return os.path.join(C["MODEL_DIR"], C["RUN"], corpus)


def train_data_settings():
    return declared(train_data.TrainDataSettings, C)


def training_queries(corpus, docs):
    """The corpus's training set (pseudo-queries, then DocAsQ passages), indexed on disk under its retriever's
    folder; `docs`: the corpus rows, streamed when the index is (re)built (see train_data.prepare)."""
    return train_data.prepare(corpus, docs, os.path.join(model_dir(corpus), "train_data"), train_data_settings())


def rank_token_id(tokenizer, model=None):
    """Id of RANK_TOKEN, added to the vocabulary (and the model resized) if missing."""
    return ranking.rank_token_id(tokenizer, C["RANK_TOKEN"], model)


def training_data(data, tokenizer, token_id):
    """A training set's examples (a dataset encoded on access) and, with the ranking loss, an endless
    supplier of its ranking batches (rank_groups.RankGroups, over the set's BM25 index; None without)."""
    lm.check_docid_tokens(tokenizer, data.docs)
    settings, supplier = train_data_settings(), None
    if C["RANK_LOSS"]:
        supplier = rank_groups.RankGroups(tokenizer, data.bm25, data.docs, data, token_id, settings)
    return train_data.EncodedExamples(data, tokenizer, settings), supplier


def train_corpus(corpus, tasks=()):
    """Train (or resume) the retriever of one corpus; returns its directory. With EVAL_EVERY_EPOCH, the tasks of
    `tasks` on this corpus are evaluated after every epoch but the last (epoch_evaluation)."""
    out = model_dir(corpus)
    if sft.training_done(out):
        log.info("%s: retriever already trained at %s", corpus, out)
        return out
    data = training_queries(corpus, train_data.CorpusFile(mair_config.corpus_docs_path(corpus, C["DATA_ROOT"])))
    model, tokenizer, resume = sft.load_for_training(C["BASE_MODEL"], out, C["PRECISION"])
    examples, supplier = training_data(data, tokenizer, rank_token_id(tokenizer, model))
    on_corpus = [t for t in tasks if mair_config.corpus_of(t, C["DATA_ROOT"]) == corpus]
    sft.train_sft(model, tokenizer, examples, out, declared(sft.SFTSettings, C),
                  extra_loss=ranking.ranknet_loss if supplier else None, extra_batches=supplier, resume_from=resume,
                  desc=f"genir {corpus}",
                  after_epoch=epoch_evaluation(on_corpus, tokenizer) if C["EVAL_EVERY_EPOCH"] and on_corpus else None)
    return out


# ---------------------------------------------------------------------------------------------- evaluation

def load_trie(corpus, tokenizer, docs, gists):
    """The corpus's prefix tree, cached next to its retriever (see trie_cache)."""
    pairs = [(d["id"], gists[d["id"]]) for d in docs if d["id"] in gists]
    return trie_cache.load_or_build(os.path.join(model_dir(corpus), "trie"), pairs, tokenizer, corpus, env_rank() == 0)


def eval_prompts(tokenizer, queries):
    """Chat-encoded prompt token ids of evaluation queries, in the training prompts' format: the
    instruction whole (MAX_EVAL_INSTRUCTION_TOKENS None) or cut to MAX_EVAL_INSTRUCTION_TOKENS tokens
    (none with INSTRUCTION_IN_PROMPT False), the query cut to MAX_EVAL_QUERY_TOKENS."""
    cut = C["MAX_EVAL_INSTRUCTION_TOKENS"]
    instructions = [C["INSTRUCTION_IN_PROMPT"] and q.get("instruction") or "" for q in queries]
    instructions = instructions if cut is None else [lm.truncate_tokens(tokenizer, i, cut) for i in instructions]
    texts = [lm.truncate_tokens(tokenizer, q["query"], C["MAX_EVAL_QUERY_TOKENS"]) for q in queries]
    return [lm.chat_prompt_ids(tokenizer, retrieval_prompt(i, text)) for i, text in zip(instructions, texts)]


def decode_settings(**changes):
    """The decoding settings of C (decoding.DecodeSettings), with `changes` (e.g. mode=...)."""
    # EVAL_BATCH_SIZE, not the training BATCH_SIZE, is the number of queries decoded together.
    values = {"mode": C["DECODE_MODE"], "batch_size": C["EVAL_BATCH_SIZE"], **changes}
    return declared(decoding.DecodeSettings, C, **values)


def decode_queries(model, tokenizer, tree, queries, mode, **changes):
    """{qid: ranked doc ids} in `mode` (and decode_settings `changes`) of this process's queries, gathered."""
    mine, state = sft.split_for_process(queries, C["DIST_TIMEOUT"])
    found = decoding.decode(model, tree, eval_prompts(tokenizer, mine), decode_settings(mode=mode, **changes),
                            keys=[str(q["qid"]) for q in mine], progress=state.is_main_process)
    local = [(str(q["qid"]), [doc for doc, _ in r.ranking]) for q, r in zip(mine, found)]
    return dict(sft.gather(local, state))


def rerank(model, tokenizer, queries, rankings, gists, token_id):
    """{qid: generated candidates re-ordered by the ranking token's logit} (see ranking.rerank) for
    this process's queries, gathered from all."""
    mine, state = sft.split_for_process(queries, C["DIST_TIMEOUT"])
    ordered = ranking.rerank(model, tokenizer, eval_prompts(tokenizer, mine),
                             [rankings.get(str(q["qid"]), []) for q in mine], gists, token_id,
                             C["RERANK_BATCH_SIZE"], progress=state.is_main_process)
    return dict(sft.gather([(str(q["qid"]), docs) for q, docs in zip(mine, ordered)], state))


@dataclasses.dataclass
class EvalTask:
    """What evaluating one task needs: its corpus, the queries to decode with their qrels, the
    corpus's trained retriever and prefix tree, and the warnings met on the way."""
    corpus: str
    docs: list
    gists: dict
    warnings: list
    queries: list
    qrels: dict
    report: dict
    model: object
    tokenizer: object
    tree: object


def load_task(task, model=None, tokenizer=None):
    """The EvalTask of an evaluation task, with its corpus's saved retriever or the given `model`, `tokenizer`."""
    corpus = mair_config.corpus_of(task, C["DATA_ROOT"])
    docs = read_docs(mair_config.corpus_docs_path(corpus, C["DATA_ROOT"]))
    gists, warnings = load_docids(mair_config.gist_path(corpus, C["GIST_TYPE"], C["DATA_ROOT"]), docs, corpus)
    queries, qrels, report = eval_queries(mair_config.queries_path(task, C["DATA_ROOT"]), {d["id"] for d in docs},
                                          C["DROP_NO_POSITIVE"])
    if model is None:
        model, tokenizer = lm.load_model(model_dir(corpus), device=sft.init_distributed(C["DIST_TIMEOUT"]).device)
    tree = load_trie(corpus, tokenizer, docs, gists)
    warnings += quality.docid_collisions(corpus, tree, C["DOCID_COLLISION_WARN"])
    return EvalTask(corpus, docs, gists, warnings, queries, qrels, report, model, tokenizer, tree)


def bm25_baseline(corpus, docs, queries, cache):
    """{qid: ranked doc ids} of the BM25 baseline (BM25_STEMMER, BM25_POSITIVE_ONLY, BM25_WITH_INSTRUCTION,
    MAX_RESULTS); the corpus's index is built once into `cache` ({corpus: index})."""
    if corpus not in cache:
        cache[corpus] = bm25.BM25Index(docs, C["BM25_STEMMER"], C["BM25_POSITIVE_ONLY"])
    return bm25.bm25_search(cache[corpus], queries, k=C["MAX_RESULTS"], with_instruction=C["BM25_WITH_INSTRUCTION"])


def zerogr_runs(t):
    """{name: {qid: ranked doc ids}} of ZeroGR on EvalTask `t`: "zerogr" and, with RERANK, "zerogr-rerank"."""
    runs = {"zerogr": decode_queries(t.model, t.tokenizer, t.tree, t.queries, C["DECODE_MODE"])}
    if C["RERANK"]:
        runs["zerogr-rerank"] = rerank(t.model, t.tokenizer, t.queries, runs["zerogr"], t.gists,
                                       rank_token_id(t.tokenizer))
    return runs


def method_metrics(qrels, runs):
    """{method: metrics.evaluate's means} of `runs` ({name: {qid: ranked doc ids}})."""
    return {METHODS[name]: metrics.evaluate(qrels, metrics.run_from_rankings(r))[0] for name, r in runs.items()}


def evaluate_task(task, bm25_cache):
    """Evaluate one task: BM25, ZeroGR (generation order) and ZeroGR reranked; returns its metrics."""
    started = time.time()
    t = load_task(task)
    t.warnings += metrics.qrels_notes(task, t.report)
    runs = {"bm25": bm25_baseline(t.corpus, t.docs, t.queries, bm25_cache), **zerogr_runs(t)}
    sources = train_data.source_paths(t.corpus, train_data_settings())  # the generators' figures beside them
    result = {"task": task, "corpus": t.corpus, "domain": mair_config.task_domain(task, C["DATA_ROOT"]),
              "queries": len(t.qrels), "decoded_queries": len(t.queries), "methods": method_metrics(t.qrels, runs),
              "qrels_report": t.report, "warnings": t.warnings, "seconds": round(time.time() - started, 1),
              "generator_quality": {k: sources[k] and quality.read_report(sources[k]) for k in ("queries", "docids")},
              "settings": {k: C[k] for k in (
                  "DECODE_MODE", "K", "SLOPE", "MIDPOINT", "T_MAX", "TOP_K", "TOP_P", "MAX_RESULTS", "SEED",
                  "BM25_WITH_INSTRUCTION", "BM25_STEMMER", "BM25_POSITIVE_ONLY", "MAX_EVAL_INSTRUCTION_TOKENS",
                  "INSTRUCTION_IN_PROMPT", "DROP_NO_POSITIVE")},
              "epochs": sft.epochs_trained(model_dir(t.corpus))}
    if env_rank() == 0:
        results.write_runs(os.path.join(run_dir(), task), runs)
        write_json(result, os.path.join(run_dir(), task, "metrics.json"))
    return result


def epoch_evaluation(tasks, tokenizer):
    """train_sft's after_epoch (EVAL_EVERY_EPOCH): ZeroGR on `tasks` with the model in training and `tokenizer`,
    logged and added to OUT_DIR/<RUN>/<task>/epochs.json; not after the last epoch (the evaluation that follows)."""
    loaded = {}  # task -> EvalTask: its corpus, queries and prefix tree are read once, at the first epoch

    def after_epoch(epoch, model):
        for task in tasks:
            if task not in loaded:
                loaded[task] = load_task(task, model, tokenizer)
            t = dataclasses.replace(loaded[task], model=model)
            found = method_metrics(t.qrels, zerogr_runs(t))
            log.info("%s: epoch %d Acc@1 %s", task, epoch, metrics.acc1_percent(found, C["ACC1"]))
            if env_rank() == 0:
                results.record_epoch(os.path.join(run_dir(), task), epoch, found)
    return after_epoch


# ---------------------------------------------------------------------------------------------- ablation, sweep

def decoded_variants(tasks, variants, prefix):
    """{name: {task: {metric: {qid: value}}}} of decoding `variants` ({name: decode_settings changes, mode included})
    with the trained retrievers, each run cached as OUT_DIR/<RUN>/<task>/<prefix>-<name>.run (C's own: zerogr.run)."""
    found = {}
    for task in tasks:
        t, done = load_task(task), {}
        for name, changes in variants.items():
            stem = "zerogr" if decode_settings(**changes) == decode_settings() else f"{prefix}-{name}"
            if stem not in done:  # once a call: every process then reads the same file (or none)
                done[stem] = results.cached_run(os.path.join(run_dir(), task, f"{stem}.run"), env_rank() == 0,
                                                lambda: metrics.run_from_rankings(decode_queries(
                                                    t.model, t.tokenizer, t.tree, t.queries, **changes)))
            means, found.setdefault(name, {})[task] = metrics.evaluate(t.qrels, done[stem])
            log.info("%s %s: %s", task, name, {m: round(v, 4) for m, v in means.items()})
    return found


def ablation(tasks):
    """Every decoding mode of ABLATION_MODES on every query of `tasks`, with the trained retrievers; table, plots."""
    found = decoded_variants(tasks, {mode: {"mode": mode} for mode in C["ABLATION_MODES"]}, "ablation")
    if env_rank() == 0:
        return results.write_ablation(run_dir(), C["RUN"], tasks, results.pooled(found), C["DECODE_MODE"],
                                      results.settings_text(decode_settings()), decode_settings().schedule(), C["ACC1"])


def sweep(tasks):
    """The reverse-annealed schedule with each value of SWEEP ({SLOPE / MIDPOINT / T_MAX: values}), one parameter
    at a time, on every query of `tasks` with the trained retrievers; sweep.md and sweep.json."""
    values = [(key, value) for key, values in C["SWEEP"].items() for value in values]
    found = decoded_variants(tasks, {f"{k}={v}": {"mode": "reverse_annealed", k.lower(): v} for k, v in values},
                             "sweep")
    if env_rank() == 0:
        return results.write_sweep(run_dir(), C["RUN"], [(k, v, v == C[k], found[f"{k}={v}"]) for k, v in values],
                                   results.settings_text(decode_settings()), C["ACC1"])


# ---------------------------------------------------------------------------------------------- main

def main(argv=None):
    parse_args("genir", C, argv=argv, description=__doc__)
    check_choices(C, {"STAGE": ("all", "train", "eval", "table", "ablation", "sweep"),
                      "BM25_STEMMER": (None, "english"), "ACC1": tuple(metrics.ACC1_DEFINITIONS),
                      "MAIR_AVERAGE": tuple(metrics.MAIR_AVERAGES), "PRECISION": sft.PRECISIONS,
                      "RANKNET_MODE": sft.RANKNET_MODES, "DOCASQ_MODE": DOCASQ_MODES})
    check_positive_int_or_none(C, "MAX_EVAL_INSTRUCTION_TOKENS")
    check_number_lists(C, "SWEEP", ("SLOPE", "MIDPOINT", "T_MAX"))
    train_data.check_settings(train_data_settings())
    setup_logging(env_rank())
    tasks = [mair_config.check_task(t, C["DATA_ROOT"]) for t in C["TASKS"]]
    if not tasks:
        raise SystemExit("no tasks: set TASKS (a config file or --TASKS=\"['SciFact']\")")
    failures = {}
    if C["STAGE"] in ("all", "train"):
        for corpus in mair_config.corpora_of(tasks, C["DATA_ROOT"]):
            try:
                train_corpus(corpus, tasks)
            except Exception as e:
                results.record_failure(failures, corpus, "training", e)
    if C["STAGE"] in ("all", "eval"):
        bm25_cache = {}
        for task in tasks:
            corpus = mair_config.corpus_of(task, C["DATA_ROOT"])
            if corpus in failures:
                continue
            if os.path.exists(os.path.join(run_dir(), task, "metrics.json")):
                log.info("%s: already evaluated, skipped", task)
                continue
            try:
                methods = evaluate_task(task, bm25_cache)["methods"]
                log.info("%s: Acc@1 %s", task, metrics.acc1_percent(methods, C["ACC1"]))
            except Exception as e:
                results.record_failure(failures, task, "evaluation", e)
    if C["STAGE"] in ("ablation", "sweep"):
        {"ablation": ablation, "sweep": sweep}[C["STAGE"]](tasks)
    elif env_rank() == 0:
        methods = [m for k, m in METHODS.items() if C["RERANK"] or k != "zerogr-rerank"]  # RERANK off: no row
        results.write_results(run_dir(), tasks, C["RUN"], methods, C["ACC1"], C["MAIR_AVERAGE"], C["WANDB"],
                              C["WANDB_PROJECT"])
    if env_rank() == 0 and C["STAGE"] in ("all", "train", "eval"):
        results.write_failures(run_dir(), C["STAGE"], failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
