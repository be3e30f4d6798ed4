"""Step 1: fine-tune the instruction-conditioned query generator (document + task instruction -> query).

    python sftqg.py [--config configs/demo.json] [--EPOCHS=5] ...
    accelerate launch --num_processes 8 sftqg.py            # 8 GPUs

Training data: SFT_DATA, JSONL `{"instruction", "query", "doc"}`; built from the real queries of
TRAIN_TASKS (MAIR layout) when the file is missing; rows with an empty query or document are skipped
with a warning (none left is an error). The loss is on the query tokens only. Writes a
checkpoint per epoch to OUT_DIR/checkpoint-epoch<N> and the final model to OUT_DIR; an interrupted
run resumes from its newest checkpoint.
"""
import logging
import os
import sys

import lm
import mair_config
from config import declared, env_rank, parse_args, setup_logging
from data import read_docs
from file_io import is_blank, iter_rows, read_or_build_rows, warn_skipped
from prompts import query_generation_prompt

C = {
    "BASE_MODEL": "models/Llama-3.2-1B-Instruct",
    "OUT_DIR": "models/Llama-3.2-1B-Instruct-qg",
    "SFT_DATA": os.path.join(mair_config.DATA_ROOT, "MAIR-Data", "sft", "qg.jsonl"),
    # Tasks whose real queries train the generator when SFT_DATA is missing. The paper's ZeroGR-Train
    # (69 tasks) is not public: point SFT_DATA at your own mix, or list training tasks here.
    "TRAIN_TASKS": [],
    "DATA_ROOT": mair_config.DATA_ROOT,
    "MAX_EXAMPLES": None,          # subsample the SFT data (None = all)
    "LR": 5e-5,
    "WARMUP_STEPS": 1000,
    "WARMUP_RATIO": 0.0,           # unused: WARMUP_STEPS sets the warmup
    "EPOCHS": 10,                  # the code's value; the paper notes say 5
    "BATCH_SIZE": 32,              # per device
    "GRAD_ACCUM": 1,
    "GRAD_CLIP": 1.0,
    "WEIGHT_DECAY": 0.0,           # AdamW weight decay; 0.0 is the current behaviour
    "MAX_LEN": 512,
    "MAX_INSTRUCTION_TOKENS": 128,
    "MAX_DOC_TOKENS": 128,
    "MAX_QUERY_TOKENS": 128,
    "KEEP_CHECKPOINTS": 0,         # newest epoch checkpoints kept (0 = all, as released)
    "DIST_TIMEOUT": 1800,          # seconds a rank waits for the others before the launch stops
    "SEED": 0,
    "LOG_EVERY": 10,
    "WANDB": "disabled",           # disabled | offline | online
    "WANDB_PROJECT": "zerogr",
}

log = logging.getLogger("sftqg")


def build_sft_data(tasks, root):
    """{"instruction", "query", "doc"} rows from the training tasks' real queries and their relevant
    documents; queries with empty text and labels of empty documents are skipped with a warning."""
    rows, missing = [], 0
    for task in tasks:
        mair_config.check_task(task)
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
                    rows.append({"instruction": q.get("instruction") or "", "query": q["query"], "doc": doc})
        warn_skipped(queries_file, empty_query, "row(s) with an empty query")
        warn_skipped(queries_file, empty_doc, "label(s) of an empty document")
    if missing:
        log.warning("%d labels point to documents missing from their corpus; skipped", missing)
    return rows


def encode(tokenizer, rows):
    examples = []
    for row in rows:
        instruction = lm.truncate_tokens(tokenizer, row["instruction"], C["MAX_INSTRUCTION_TOKENS"])
        doc = lm.truncate_tokens(tokenizer, row["doc"], C["MAX_DOC_TOKENS"])
        query = lm.truncate_tokens(tokenizer, row["query"], C["MAX_QUERY_TOKENS"])
        examples.append(lm.encode_example(tokenizer, query_generation_prompt(instruction, doc), query, C["MAX_LEN"]))
    return examples


def main(argv=None):
    parse_args("sftqg", C, argv=argv, description=__doc__)
    setup_logging(env_rank())
    rows = read_or_build_rows(C["SFT_DATA"], ("instruction", "query", "doc"),
                              lambda: build_sft_data(C["TRAIN_TASKS"], C["DATA_ROOT"]), nonempty=("query", "doc"),
                              max_rows=C["MAX_EXAMPLES"], save=env_rank() == 0)
    settings = declared(lm.SFTSettings, C)
    lm.run_sft(C["BASE_MODEL"], C["OUT_DIR"], settings, lambda tokenizer: encode(tokenizer, rows), desc="sftqg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
