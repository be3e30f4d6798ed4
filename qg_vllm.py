"""Step 2: sample NUM_Q pseudo-queries for every document with the instruction-tuned query generator.

Shard mode (one process, usually one GPU):
    python qg_vllm.py -pid 0 -total_num 8 -docs_path dataset/MAIR-Docs/SciFact/docs.jsonl \
        -data_name SciFact -model_name models/Llama-3.2-1B-Instruct-qg -model_sufix QG -num_q 16
    -> dataset/MAIR-Data/QG-16/SciFact/queries-0-8.jsonl
Launcher mode (`-total_num 0`, the default): the shards of every corpus of TASKS run on the
visible GPUs (CUDA_VISIBLE_DEVICES, else all), one process per GPU at a time, then merge into
dataset/MAIR-Data/<MODEL_SUFIX>-<NUM_Q>/<corpus>/queries.jsonl; finished corpora and shards are
skipped and unfinished shards resume. Logs: LOG_DIR/qg_vllm-<corpus>-<pid>-<total_num>.log.
    python qg_vllm.py [--config configs/demo.json] [--NUM_Q=16] ...
Two nodes sharing the filesystem: `--TOTAL_NUM=16 --PID_END=7` on one, `--TOTAL_NUM=16
--PID_START=8` on the other, then `--TOTAL_NUM=16 --MERGE_ONLY=True` on either.

Backend: vLLM when it imports and a GPU is present, else batched transformers `generate`, both
sampling at temperature 1 with at most 64 new tokens.
"""
import logging
import os
import sys

import lm
import mair_config
import shards
from config import parse_args, setup_logging
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
    "SEED": 0,
    "DATA_ROOT": mair_config.DATA_ROOT,
    "LOG_DIR": "log",
}

log = logging.getLogger("qg_vllm")


def query_rows(generator, tokenizer, docs, instruction, num_q):
    prompts = [lm.chat_prompt_ids(tokenizer, query_generation_prompt(instruction, d["prepared"])) for d in docs]
    outputs = generator.generate(prompts, n=num_q, temperature=C["TEMPERATURE"], top_p=C["TOP_P"],
                                 max_tokens=C["MAX_TOKENS"], desc="queries")
    return [{"instruction": instruction, "query": query, "labels": [{"id": d["id"], "score": 1}]}
            for d, queries in zip(docs, outputs) for query in queries]


def doc_key(row):
    return row["labels"][0]["id"]


def final_path(corpus, model_sufix=None, num_q=None):
    return mair_config.pseudo_queries_path(corpus, model_sufix or C["MODEL_SUFIX"], num_q or C["NUM_Q"],
                                           C["DATA_ROOT"])


def gen(docs_path, data_name, pid, total_num, model_sufix, model_name, num_q):
    """Generate one shard of pseudo-queries."""
    docs = shards.shard_docs(shards.read_docs(docs_path), pid, total_num)
    instruction = shards.task_instruction(docs_path)
    out = mair_config.shard_path(final_path(data_name, model_sufix, num_q), pid, total_num)
    log.info("%s shard %d/%d: %d documents, instruction %r -> %s", data_name, pid, total_num, len(docs),
             instruction, out)
    settings = shards.Generation(C["BACKEND"], C["BATCH_SIZE"], C["SEED"], C["GPU_MEMORY_UTILIZATION"],
                                 C["DOC_WORDS"], C["DOC_TOKENS"])
    generator, tokenizer = shards.load_generator(model_name, settings, pid)

    def chunk(batch):
        return query_rows(generator, tokenizer, shards.prepare_docs(tokenizer, batch, settings), instruction, num_q)

    return shards.generate_shard(docs, out, chunk, num_q, doc_key, C["CHUNK_DOCS"], desc=f"{data_name} {pid}")


def main(argv=None):
    args = parse_args("qg_vllm", C, shards.GEN_FLAGS, argv, __doc__)
    setup_logging()
    model_sufix = args.model_sufix or C["MODEL_SUFIX"]
    model_name = args.model_name or C["MODEL_NAME"]
    num_q = args.num_q or C["NUM_Q"]
    if args.total_num > 0:
        if not args.docs_path or not args.data_name:
            raise SystemExit("shard mode (-total_num > 0) needs -docs_path and -data_name")
        gen(args.docs_path, args.data_name, args.pid, args.total_num, model_sufix, model_name, num_q)
        return 0
    C.update(MODEL_SUFIX=model_sufix, MODEL_NAME=model_name, NUM_Q=num_q)
    run = shards.Launch(C["TASKS"], C["TOTAL_NUM"], C["PID_START"], C["PID_END"], C["MERGE_ONLY"],
                        C["GPU_MEMORY_UTILIZATION"], C["DATA_ROOT"], C["LOG_DIR"])
    flags = ["-model_sufix", model_sufix, "-model_name", model_name, "-num_q", str(num_q), *args.passthrough]
    failed = shards.launch_all(os.path.abspath(__file__), run, flags, final_path, num_q, doc_key)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
