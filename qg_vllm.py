"""Step 2: sample NUM_Q pseudo-queries for every document with the instruction-tuned query generator.

Shard mode (one process, usually one GPU):
    python qg_vllm.py -pid 0 -total_num 8 -docs_path dataset/MAIR-Docs/SciFact/docs.jsonl \
        -data_name SciFact -model_name models/Llama-3.2-1B-Instruct-qg -model_sufix QG -num_q 16
    -> dataset/MAIR-Data/QG-16/SciFact/queries-0-8.jsonl
Launcher mode (`-total_num 0`, the default): the shards of every corpus of TASKS run on the
visible GPUs (CUDA_VISIBLE_DEVICES, else all), one process per GPU at a time, then merge into
dataset/MAIR-Data/<MODEL_SUFIX>-<NUM_Q>/<corpus>/queries.jsonl; finished corpora and shards are
skipped and unfinished shards resume. Logs: LOG_DIR/qg_vllm-<corpus>-<pid>-<total_num>.log.
Pseudo-query figures (quality.py: self-retrieval, duplicates, length) go to queries.quality.json.
    python qg_vllm.py [--config configs/demo.json] [--NUM_Q=16] ...
Two nodes sharing the filesystem: `--TOTAL_NUM=16 --PID_END=7` on one, `--TOTAL_NUM=16
--PID_START=8` on the other, then `--TOTAL_NUM=16 --MERGE_ONLY=True` on either.

Backend: vLLM when it imports and a GPU is present, else batched transformers `generate`, both
sampling at temperature 1 with at most 64 new tokens.
"""
import functools
import sys

import lm
import mair_config
import quality
import shards
from config import declared, parse_args, setup_logging
from data import read_docs, task_instruction
from prompts import query_generation_prompt

C = {
    "MODEL_NAME": "models/Llama-3.2-1B-Instruct-qg",   # the query generator trained by sftqg.py
    "MODEL_SUFIX": "QG",                               # output folder MAIR-Data/<MODEL_SUFIX>-<NUM_Q>
    "NUM_Q": 16,                                       # pseudo-queries per document (paper: B = 16)
    "TASKS": mair_config.get_all_tasks(),              # launcher: index the corpora of these tasks
    "TOTAL_NUM": 0,                                    # launcher: shards per corpus (0 = one per visible GPU, 1 on CPU)
    "PID_START": 0,                                    # launcher, several nodes: this node runs shards
    "PID_END": None,                                   #   PID_START..PID_END (inclusive; None = the last)
    "MERGE_ONLY": False,                               # launcher: only merge the shards (all nodes done)
    "TEMPERATURE": 1.0,
    "TOP_P": 1.0,
    "MAX_TOKENS": 64,
    "DOC_WORDS": 128,                                  # document cut to its first words, then tokens
    "DOC_TOKENS": 300,
    "BACKEND": "auto",                                 # auto | vllm | transformers
    "BATCH_SIZE": 64,                                  # prompts per transformers generate call
    "CHUNK_DOCS": 512,                                 # documents per resumable chunk
    "GPU_MEMORY_UTILIZATION": None,                    # GPU memory share per vLLM engine; None = vLLM's
                                                       #   default, one engine per GPU; 0.3 = 3 per GPU
    "ZERO_SHOT": False,                                # True: a model not fine-tuned (asked for the reply only)
    "SEED": 0,
    "QUALITY_DOCS": 2000,                              # documents whose pseudo-queries are scored (quality.py; 0 = all)
    "DATA_ROOT": mair_config.DATA_ROOT,
    "LOG_DIR": "log",
}


def query_rows(instruction, num_q, generator, tokenizer, docs):
    prompts = [lm.chat_prompt_ids(tokenizer, query_generation_prompt(instruction, d["prepared"], C["ZERO_SHOT"]))
               for d in docs]
    outputs = generator.generate(prompts, n=num_q, temperature=C["TEMPERATURE"], top_p=C["TOP_P"],
                                 max_tokens=C["MAX_TOKENS"], desc="queries")
    return [{"instruction": instruction, "query": query, "labels": [{"id": d["id"], "score": 1}]}
            for d, queries in zip(docs, outputs) for query in queries]


def output(model_sufix, num_q):
    """NUM_Q pseudo-queries per document, in MAIR-Data/<MODEL_SUFIX>-<NUM_Q>/<corpus>/queries.jsonl."""
    return shards.Output(lambda corpus: mair_config.pseudo_queries_path(corpus, model_sufix, num_q, C["DATA_ROOT"]),
                         num_q, lambda row: row["labels"][0]["id"], figures=query_figures, what="pseudo-query")


def query_figures(docs, rows):
    """Pseudo-query figures (quality.py) of the rows of the scored documents."""
    by_doc = {}
    for row in rows:
        by_doc.setdefault(str(row["labels"][0]["id"]), []).append(row["query"])
    return quality.query_quality(docs, by_doc)


def gen(docs_path, data_name, pid, total_num, model_sufix, model_name, num_q):
    """Generate one shard of pseudo-queries."""
    docs = read_docs(docs_path)
    instruction = task_instruction(docs_path)
    return shards.run_shard(__file__, declared(shards.Generation, C), docs, data_name, pid, total_num, model_name,
                            output(model_sufix, num_q),
                            functools.partial(query_rows, instruction, num_q), note=f", instruction {instruction!r}")


def main(argv=None):
    args = parse_args("qg_vllm", C, shards.GEN_FLAGS, argv, __doc__)
    setup_logging()
    model_sufix = args.model_sufix or C["MODEL_SUFIX"]
    model_name = args.model_name or C["MODEL_NAME"]
    num_q = args.num_q or C["NUM_Q"]
    flags = ["-model_sufix", model_sufix, "-model_name", model_name, "-num_q", str(num_q)]
    shard = functools.partial(gen, model_sufix=model_sufix, model_name=model_name, num_q=num_q)
    return shards.run(__file__, declared(shards.Launch, C), args, shard, output(model_sufix, num_q), flags)


if __name__ == "__main__":
    sys.exit(main())
