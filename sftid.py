"""Step 3: fine-tune the DocID generator (document -> short keyword DocID).

    python sftid.py [--config configs/demo.json] [--TEACHER_FILE=gpt4o_docids.jsonl] ...
    accelerate launch --num_processes 8 sftid.py

Training data: SFT_DATA, JSONL `{"instruction", "input", "output"}` (instruction = the DocID rules,
input = document, output = DocID). Built when missing (data.docid_sft_rows) from the documents of
TRAIN_TASKS, with targets from TEACHER_FILE (JSONL `{"id", "gist"}`, optionally `"task"`; the paper
used GPT-4o) where it has the document, else from the built-in extractive teacher that follows the
same rules. Rows with an empty input or output are skipped with a warning (none left is an error).
"""
import os
import sys

import lm
import mair_config
import sft
from config import check_choices, declared, env_rank, parse_args, setup_logging
from data import docid_sft_rows
from file_io import read_or_build_rows
from prompts import docid_prompt

C = {
    "BASE_MODEL": "models/Llama-3.2-1B-Instruct",
    "OUT_DIR": "models/Llama-3.2-1B-Instruct-ID",
    "SFT_DATA": os.path.join(mair_config.DATA_ROOT, "MAIR-Data", "sft", "docid.jsonl"),
    "TRAIN_TASKS": [],             # tasks whose documents make the SFT data when SFT_DATA is missing
    "TEACHER_FILE": None,          # JSONL {"id", "gist"[, "task"]} of teacher DocIDs (e.g. GPT-4o)
    "DATA_ROOT": mair_config.DATA_ROOT,
    "MAX_EXAMPLES": None,
    "LR": 5e-5,
    "WARMUP_STEPS": 200,
    "WARMUP_RATIO": 0.0,           # unused: WARMUP_STEPS sets the warmup
    "EPOCHS": 3,                   # the code's value; the paper notes say 5
    "MAX_STEPS": None,             # a budget of optimizer steps instead (None: EPOCHS whole epochs, as released)
    "BATCH_SIZE": 32,
    "GRAD_ACCUM": 1,
    "GRAD_CLIP": 1.0,
    "WEIGHT_DECAY": 0.01,          # AdamW weight decay (0.01: torch's default, as released)
    "PRECISION": "bf16",           # on CUDA: "bf16" = bf16 weights, AdamW on them (released);
                                   #   "fp32_autocast" = fp32 weights, bf16 autocast (CPU: fp32 either way)
    "MAX_LEN": 512,
    "MAX_INSTRUCTION_TOKENS": 200,
    "MAX_DOC_TOKENS": 256,
    "KEEP_CHECKPOINTS": 0,         # newest epoch checkpoints kept (0 = all, as released)
    "DIST_TIMEOUT": 1800,          # seconds a rank waits for the others before the launch stops
    "SEED": 0,
    "LOG_EVERY": 10,
    "WANDB": "disabled",
    "WANDB_PROJECT": "zerogr",
}


def encode(tokenizer, rows):
    examples = []
    for row in rows:
        rules = lm.truncate_tokens(tokenizer, row["instruction"], C["MAX_INSTRUCTION_TOKENS"])
        doc = lm.truncate_tokens(tokenizer, row["input"], C["MAX_DOC_TOKENS"])
        examples.append(lm.encode_example(tokenizer, docid_prompt(doc, rules), row["output"], C["MAX_LEN"]))
    return examples


def main(argv=None):
    parse_args("sftid", C, argv=argv, description=__doc__)
    check_choices(C, {"PRECISION": sft.PRECISIONS})
    setup_logging(env_rank())
    rows = read_or_build_rows(C["SFT_DATA"], ("instruction", "input", "output"),
                              lambda: docid_sft_rows(C["TRAIN_TASKS"], C["DATA_ROOT"], C["TEACHER_FILE"]),
                              nonempty=("input", "output"), max_rows=C["MAX_EXAMPLES"], save=env_rank() == 0)
    settings = declared(sft.SFTSettings, C, ranknet_mode="joint")  # no extra loss here: the mode is unused
    sft.run_sft(C["BASE_MODEL"], C["OUT_DIR"], settings, lambda tokenizer: encode(tokenizer, rows), desc="sftid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
