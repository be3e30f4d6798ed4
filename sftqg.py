"""Step 1: fine-tune the instruction-conditioned query generator (document + task instruction -> query).

    python sftqg.py [--config configs/demo.json] [--EPOCHS=5] ...
    accelerate launch --num_processes 8 sftqg.py            # 8 GPUs

Training data: SFT_DATA, JSONL `{"instruction", "query", "doc", "source"}` (`python -m
dataset.qg_training` makes it from public training sets); built from the real queries of
TRAIN_TASKS (MAIR layout; data.query_sft_rows) when the file is missing; rows with an empty query
or document are skipped with a warning (none left is an error). Rows from the tasks of EVAL_TASKS
(by source or query text) are refused (data.eval_overlap) unless ALLOW_EVAL_OVERLAP. The loss is
on the query tokens only. Writes a checkpoint per epoch to OUT_DIR/checkpoint-epoch<N> and the
final model to OUT_DIR; an interrupted run resumes from its newest checkpoint.
"""
import os
import sys

import lm
import mair_config
import sft
from config import check_choices, declared, env_rank, parse_args, setup_logging
from data import eval_overlap, query_sft_rows
from file_io import iter_rows, read_or_build_rows
from prompts import query_generation_prompt

C = {
    "BASE_MODEL": "models/Llama-3.2-1B-Instruct",
    "OUT_DIR": "models/Llama-3.2-1B-Instruct-qg",
    "SFT_DATA": os.path.join(mair_config.DATA_ROOT, "MAIR-Data", "sft", "qg.jsonl"),
    # Tasks whose real queries train the generator when SFT_DATA is missing. The paper's ZeroGR-Train
    # (69 tasks) is not public: point SFT_DATA at your own mix, or list training tasks here.
    "TRAIN_TASKS": [],
    # Tasks evaluated later: SFT rows whose "source" is one of them or whose query is one of their
    # queries are refused ([] = no check); ALLOW_EVAL_OVERLAP=True only warns.
    "EVAL_TASKS": [],
    "ALLOW_EVAL_OVERLAP": False,
    "DATA_ROOT": mair_config.DATA_ROOT,
    "MAX_EXAMPLES": None,          # subsample the SFT data (None = all)
    "LR": 5e-5,
    "WARMUP_STEPS": 1000,
    "WARMUP_RATIO": 0.0,           # unused: WARMUP_STEPS sets the warmup
    "EPOCHS": 10,                  # the code's value; the paper notes say 5
    "MAX_STEPS": None,             # a budget of optimizer steps instead (None: EPOCHS whole epochs, as released)
    "BATCH_SIZE": 32,              # per device
    "GRAD_ACCUM": 1,
    "GRAD_CLIP": 1.0,
    "WEIGHT_DECAY": 0.01,          # AdamW weight decay (0.01: torch's default, as released)
    "PRECISION": "bf16",           # on CUDA: "bf16" = bf16 weights, AdamW on them (released);
                                   #   "fp32_autocast" = fp32 weights, bf16 autocast (CPU: fp32 either way)
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
    check_choices(C, {"PRECISION": sft.PRECISIONS})
    setup_logging(env_rank())
    rows = read_or_build_rows(C["SFT_DATA"], ("instruction", "query", "doc"),
                              lambda: query_sft_rows(C["TRAIN_TASKS"], C["DATA_ROOT"]), nonempty=("query", "doc"),
                              max_rows=C["MAX_EXAMPLES"], save=env_rank() == 0)
    numbered = iter_rows(C["SFT_DATA"]) if os.path.exists(C["SFT_DATA"]) else enumerate(rows, 1)
    eval_overlap(numbered, C["SFT_DATA"], C["EVAL_TASKS"], C["DATA_ROOT"], C["ALLOW_EVAL_OVERLAP"])
    settings = declared(sft.SFTSettings, C, ranknet_mode="joint")  # no extra loss here: the mode is unused
    sft.run_sft(C["BASE_MODEL"], C["OUT_DIR"], settings, lambda tokenizer: encode(tokenizer, rows), desc="sftqg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
