"""Step 5: train the generative retriever per corpus, build its prefix tree, decode ranked DocIDs
with reverse-annealed sampling, and evaluate next to BM25; also the decoding ablation.

    python genir.py [--config configs/demo.json]            # train + evaluate every task of TASKS
    accelerate launch --num_processes 8 genir.py             # 8 GPUs: DDP training, queries split
    python genir.py --STAGE=ablation                         # decoding ablation on the trained retrievers
    python genir.py --STAGE=table                            # rebuild results.md from finished tasks

Per corpus: MODEL_DIR/<RUN>/<corpus>/ (retriever checkpoints, trie/). Per task:
OUT_DIR/<RUN>/<task>/{bm25,zerogr,zerogr-rerank}.run (TREC) and metrics.json; then
OUT_DIR/<RUN>/results.md (paper-style tables) and, for the ablation, a run per mode and task
(ablation-<mode>.run), ablation.md / ablation.png / schedule.png. Finished tasks and ablation runs
are reused on a rerun (delete them to recompute), a prefix tree that does not load is rebuilt; a
failing corpus or task is reported in OUT_DIR/<RUN>/failures.json (while it stands) and the others go on.
"""
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import bm25
import decoding
import lm
import mair_config
import metrics
import quality
import ranking
import results
import sft
import train_data
from config import check_choices, declared, env_rank, parse_args, setup_logging
from data import eval_queries, load_docids, read_docs
from file_io import DataError, write_json
from prefix_tree import PrefixTree, TrieCacheError
from prompts import retrieval_prompt

C = {
    "BASE_MODEL": "models/Llama-3.2-3B-Instruct",   # ZeroGR-3B (the released code used the 1B model)
    "MODEL_DIR": "models/genir",                    # retrievers: MODEL_DIR/<RUN>/<corpus>
    "OUT_DIR": "out",                               # results: OUT_DIR/<RUN>/
    "RUN": "zerogr",
    "TASKS": [],                                    # evaluation tasks (see README: the paper's lists are unknown)
    "STAGE": "all",                                 # all | train | eval | table | ablation
    "DATA_ROOT": mair_config.DATA_ROOT,
    # training data
    "QG_SUFIX": "QG",                               # pseudo-queries: MAIR-Data/<QG_SUFIX>-<NUM_Q>/<corpus>
    "NUM_Q": 16,
    "DOCASQ_N": 16,                                 # document-as-query passages per document (0: none)
    "DOCASQ_WORDS": 32,                             # words per passage
    "GIST_TYPE": "title",                           # DocIDs: MAIR-Data/gist_ids/<corpus>/<GIST_TYPE>.jsonl
    # optimisation (the original code's values)
    "LR": 5e-5,
    "WARMUP_RATIO": 0.5,                            # warmup = half an epoch
    "WARMUP_STEPS": None,                           # None: WARMUP_RATIO
    "EPOCHS": 5,
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
    "MAX_EVAL_INSTRUCTION_TOKENS": None,            # evaluation prompts: None = the whole instruction (released);
                                                    #   an int cuts it to that many tokens (as in training)
    # ranking loss of the original code: every RANK_EVERY steps, groups of 1 positive + GROUP_SIZE-1
    # BM25 negatives scored by RANK_TOKEN's logit at the last position, RankNet loss
    "RANK_LOSS": True,
    "RANK_EVERY": 8,
    "GROUP_SIZE": 8,
    "RANK_TOKEN": "<|reserved_special_token_0|>",
    "NEGATIVE_DEPTH": 100,
    "RANKNET_MODE": "released",                     # "released": a ranking step of its own (backward, optimizer
                                                    #   and scheduler step) after the LM step, negatives drawn
                                                    #   again at each draw, short groups padded with "NONE";
                                                    #   "joint": ranking loss added to the LM loss, each group's
                                                    #   negatives fixed (seeded), short lists topped up at random
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
    "BM25_STEMMER": None,                           # BM25 (baseline and negatives): None = no stemming (released);
                                                    #   "english" = PyStemmer's English stemmer
    "BM25_POSITIVE_ONLY": False,                    # False: top MAX_RESULTS / NEGATIVE_DEPTH whatever the score,
                                                    #   zero-score documents last (released); True: scored ones only
    "DROP_NO_POSITIVE": False,                      # True: queries with no relevant label leave the qrels (BEIR)
    "DOCID_COLLISION_WARN": 0.5,                    # warn when more documents than this share their DocID
    "ACC1": "p@1",                                  # tables' Acc@1: "p@1" (the paper's accuracy) or "ndcg@1"
                                                    #   (what the released code logged as its top-1 metric)
    "MAIR_AVERAGE": "domains",                      # MAIR avg: mean of the domain averages ("domains", the
                                                    #   paper's table) or mean over the tasks ("tasks")
    "ABLATION_MODES": ["greedy", "iterative_greedy", "nucleus", "reverse_annealed", "beam"],
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


def generator_quality(corpus):
    """The figures qg_vllm.py and title_vllm.py wrote beside the corpus's pseudo-queries and DocIDs."""
    sources = train_data.source_paths(corpus, train_data_settings())
    return {"queries": quality.read_report(sources["queries"]), "docids": quality.read_report(sources["docids"])}


def training_queries(corpus, docs):
    """The corpus's training set (pseudo-queries, then document-as-query passages, built when
    missing), indexed on disk under its retriever's folder; `docs`: the corpus rows, streamed when
    the index is (re)built (see train_data.prepare)."""
    return train_data.prepare(corpus, docs, os.path.join(model_dir(corpus), "train_data"), train_data_settings())


def rank_token_id(tokenizer, model=None):
    """Id of RANK_TOKEN, added to the vocabulary (and the model resized) if missing."""
    return ranking.rank_token_id(tokenizer, C["RANK_TOKEN"], model)


def training_data(data, tokenizer, token_id):
    """A training set's examples (a dataset encoded on access) and, with the ranking loss, an endless
    supplier of its ranking batches (train_data.RankGroups, over the set's BM25 index; None without)."""
    lm.check_docid_tokens(tokenizer, data.docs)
    settings = train_data_settings()
    supplier = None
    if C["RANK_LOSS"]:
        supplier = train_data.RankGroups(tokenizer, data.bm25, data.docs, data, token_id, settings)
    return train_data.EncodedExamples(data, tokenizer, settings), supplier


def train_corpus(corpus):
    """Train (or resume) the retriever of one corpus; returns its directory."""
    out = model_dir(corpus)
    if sft.training_done(out):
        log.info("%s: retriever already trained at %s", corpus, out)
        return out
    data = training_queries(corpus, train_data.CorpusFile(mair_config.corpus_docs_path(corpus, C["DATA_ROOT"])))
    model, tokenizer, resume = sft.load_for_training(C["BASE_MODEL"], out, C["PRECISION"])
    examples, supplier = training_data(data, tokenizer, rank_token_id(tokenizer, model))
    sft.train_sft(model, tokenizer, examples, out, declared(sft.SFTSettings, C),
                 extra_loss=ranking.ranknet_loss if supplier else None, extra_batches=supplier, resume_from=resume,
                 desc=f"genir {corpus}")
    return out


# ---------------------------------------------------------------------------------------------- evaluation

def load_trie(corpus, tokenizer, docs, gists):
    """The corpus's prefix tree, saved next to its retriever with a fingerprint of the DocIDs and
    the tokenizer; rebuilt when they change or the saved tree does not load."""
    path = os.path.join(model_dir(corpus), "trie")
    pairs = [(d["id"], gists[d["id"]]) for d in docs if d["id"] in gists]
    digest = hashlib.sha1(json.dumps([pairs, len(tokenizer), tokenizer.eos_token]).encode()).hexdigest()
    if os.path.exists(path):
        try:
            tree = PrefixTree.load(path)
            if tree.source == digest:
                return tree
        except TrieCacheError as e:
            log.warning("%s: %s; rebuilding it", corpus, e)
    tree = PrefixTree.build(pairs, tokenizer)
    tree.source = digest
    if env_rank() == 0:
        tree.save(path)
        log.info("%s: prefix tree of %d DocIDs (%d leaves) -> %s", corpus, len(pairs), tree.n_leaves, path)
    return tree


def eval_prompts(tokenizer, queries):
    """Chat-encoded prompt token ids of evaluation queries, in the training prompts' format: the
    instruction whole (MAX_EVAL_INSTRUCTION_TOKENS None) or cut to MAX_EVAL_INSTRUCTION_TOKENS tokens,
    the query cut to MAX_EVAL_QUERY_TOKENS."""
    cut = C["MAX_EVAL_INSTRUCTION_TOKENS"]
    instructions = [q.get("instruction") or "" for q in queries]
    if cut is not None:
        instructions = [lm.truncate_tokens(tokenizer, text, cut) for text in instructions]
    return [lm.chat_prompt_ids(tokenizer, retrieval_prompt(i, lm.truncate_tokens(tokenizer, q["query"],
                                                                                   C["MAX_EVAL_QUERY_TOKENS"])))
            for i, q in zip(instructions, queries)]


def decode_settings(**changes):
    """The decoding settings of C (decoding.DecodeSettings), with `changes` (e.g. mode=...)."""
    # EVAL_BATCH_SIZE, not the training BATCH_SIZE, is the number of queries decoded together.
    values = {"mode": C["DECODE_MODE"], "batch_size": C["EVAL_BATCH_SIZE"], **changes}
    return declared(decoding.DecodeSettings, C, **values)


def decode_queries(model, tokenizer, tree, queries, mode):
    """{qid: ranked doc ids} decoded in `mode` for this process's queries, gathered from all."""
    mine, state = sft.split_for_process(queries, C["DIST_TIMEOUT"])
    found = decoding.decode(model, tree, eval_prompts(tokenizer, mine), decode_settings(mode=mode),
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


@dataclass
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


def load_task(task):
    """The EvalTask of an evaluation task."""
    corpus = mair_config.corpus_of(task, C["DATA_ROOT"])
    docs = read_docs(mair_config.corpus_docs_path(corpus, C["DATA_ROOT"]))
    gists, warnings = load_docids(mair_config.gist_path(corpus, C["GIST_TYPE"], C["DATA_ROOT"]), docs, corpus)
    queries, qrels, report = eval_queries(mair_config.queries_path(task, C["DATA_ROOT"]), {d["id"] for d in docs},
                                          C["DROP_NO_POSITIVE"])
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


def evaluate_task(task, bm25_cache):
    """Evaluate one task: BM25, ZeroGR (generation order) and ZeroGR reranked; returns its metrics."""
    started = time.time()
    t = load_task(task)
    t.warnings += metrics.qrels_notes(task, t.report)
    runs = {"bm25": bm25_baseline(t.corpus, t.docs, t.queries, bm25_cache)}
    runs["zerogr"] = decode_queries(t.model, t.tokenizer, t.tree, t.queries, C["DECODE_MODE"])
    if C["RERANK"]:
        runs["zerogr-rerank"] = rerank(t.model, t.tokenizer, t.queries, runs["zerogr"], t.gists,
                                       rank_token_id(t.tokenizer))
    result = {"task": task, "corpus": t.corpus, "domain": mair_config.task_domain(task, C["DATA_ROOT"]),
              "queries": len(t.qrels),
              "decoded_queries": len(t.queries), "methods": {}, "qrels_report": t.report, "warnings": t.warnings}
    for name, rankings in runs.items():
        result["methods"][METHODS[name]], _ = metrics.evaluate(t.qrels, metrics.run_from_rankings(rankings))
    result["seconds"] = round(time.time() - started, 1)
    result["generator_quality"] = generator_quality(t.corpus)
    result["settings"] = {k: C[k] for k in ("DECODE_MODE", "K", "SLOPE", "MIDPOINT", "T_MAX", "TOP_K", "TOP_P",
                                            "MAX_RESULTS", "SEED", "BM25_WITH_INSTRUCTION", "BM25_STEMMER",
                                            "BM25_POSITIVE_ONLY", "MAX_EVAL_INSTRUCTION_TOKENS", "DROP_NO_POSITIVE")}
    if env_rank() == 0:
        results.write_runs(os.path.join(run_dir(), task), runs)
        write_json(result, os.path.join(run_dir(), task, "metrics.json"))
    return result


# ---------------------------------------------------------------------------------------------- ablation

def ablation(tasks):
    """Every decoding mode on every query of `tasks`, with the trained retrievers; table and plots."""
    per_query = {}
    for task in tasks:
        t = load_task(task)
        for mode in C["ABLATION_MODES"]:
            name = "zerogr" if mode == C["DECODE_MODE"] else f"ablation-{mode}"
            path = os.path.join(run_dir(), task, f"{name}.run")
            if os.path.exists(path):  # the main run, or a mode finished by an earlier ablation run
                run = metrics.read_trec_run(path)
            else:
                run = metrics.run_from_rankings(decode_queries(t.model, t.tokenizer, t.tree, t.queries, mode))
                if env_rank() == 0:
                    metrics.write_trec_run(run, path, name)
            _, values = metrics.evaluate(t.qrels, run)
            for metric, by_qid in values.items():
                per_query.setdefault(mode, {}).setdefault(metric, {}).update(
                    {f"{task}/{qid}": v for qid, v in by_qid.items()})
            log.info("%s %s: %s", task, mode, {m: round(sum(v.values()) / max(len(v), 1), 4)
                                               for m, v in values.items()})
    if env_rank() != 0:
        return None
    s = decode_settings()
    settings = (f"K={s.K}, k={s.slope}, m={s.midpoint}, T_max={s.t_max}, top-k={s.top_k}, top-p={s.top_p}, "
                f"nucleus T={s.nucleus_temperature}, beams={s.num_beams or s.K}")
    return results.write_ablation(run_dir(), C["RUN"], tasks, per_query, C["DECODE_MODE"], settings, s.schedule(),
                                  C["ACC1"])


# ---------------------------------------------------------------------------------------------- main

def record_failure(failures, name, step, error):
    """One corpus or task failing does not stop the others; under a multi-process launch only bad data
    (met by every rank alike) is skipped: another error ends this rank and the launcher stops the rest."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not isinstance(error, DataError):
        log.error("rank %d: %s %s failed; stopping this launch (rerun to resume)", env_rank(), name, step)
        raise error
    log.exception("%s: %s failed", name, step)
    failures[name] = f"{step}: {type(error).__name__}: {error}"


def check_eval_instruction_tokens(value):
    """SystemExit unless MAX_EVAL_INSTRUCTION_TOKENS is None or a positive int (its default None takes any value)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SystemExit(f"settings: MAX_EVAL_INSTRUCTION_TOKENS={value!r} is not None or a positive int")


def main(argv=None):
    parse_args("genir", C, argv=argv, description=__doc__)
    check_choices(C, {"STAGE": ("all", "train", "eval", "table", "ablation"), "BM25_STEMMER": (None, "english"),
                      "ACC1": tuple(metrics.ACC1_DEFINITIONS), "MAIR_AVERAGE": tuple(metrics.MAIR_AVERAGES),
                      "PRECISION": sft.PRECISIONS, "RANKNET_MODE": sft.RANKNET_MODES})
    check_eval_instruction_tokens(C["MAX_EVAL_INSTRUCTION_TOKENS"])
    setup_logging(env_rank())
    tasks = [mair_config.check_task(t, C["DATA_ROOT"]) for t in C["TASKS"]]
    if not tasks:
        raise SystemExit("no tasks: set TASKS (a config file or --TASKS=\"['SciFact']\")")
    failures = {}
    if C["STAGE"] in ("all", "train"):
        for corpus in mair_config.corpora_of(tasks, C["DATA_ROOT"]):
            try:
                train_corpus(corpus)
            except Exception as e:
                record_failure(failures, corpus, "training", e)
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
                result = evaluate_task(task, bm25_cache)
                log.info("%s: Acc@1 %s", task, {m: round(metrics.with_acc1(v, C["ACC1"])["Acc@1"] * 100, 1)
                                                 for m, v in result["methods"].items()})
            except Exception as e:
                record_failure(failures, task, "evaluation", e)
    if C["STAGE"] == "ablation":
        ablation(tasks)
    elif env_rank() == 0:
        results.write_results(run_dir(), tasks, C["RUN"], list(METHODS.values()), C["ACC1"], C["MAIR_AVERAGE"],
                              C["WANDB"], C["WANDB_PROJECT"])
    if env_rank() == 0 and C["STAGE"] in ("all", "train", "eval"):
        results.write_failures(run_dir(), C["STAGE"], failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
