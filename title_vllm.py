"""Step 4: write a keyword DocID for every document with the DocID generator.

Shard mode:
    python title_vllm.py -pid 0 -total_num 8 -docs_path dataset/MAIR-Docs/SciFact/docs.jsonl \
        -data_name SciFact -model_name models/Llama-3.2-1B-Instruct-ID
    -> dataset/MAIR-Data/gist_ids/SciFact/title-0-8.jsonl
Launcher mode (`-total_num 0`, the default): the shards of every corpus of TASKS on the visible
GPUs, one process per GPU at a time, merged into dataset/MAIR-Data/gist_ids/<corpus>/title.jsonl
(`{"id", "gist"}` per document); several nodes as in qg_vllm.py (PID_START, PID_END, MERGE_ONLY).

Each generated DocID goes through the format normaliser (docids.py), which also drops words that
do not come from the document and fills a DocID shorter than 6 words with the document's most
distinctive terms; one that is empty after it is replaced by the extractive teacher's DocID and
counted.
"""
import logging
import os
import sys

import lm
import mair_config
import shards
from config import parse_args, setup_logging
from docids import ExtractiveTeacher, normalize_docid
from prompts import docid_prompt

C = {
    "MODEL_NAME": "models/Llama-3.2-1B-Instruct-ID",   # the DocID generator trained by sftid.py
    "MODEL_SUFIX": "title",                            # DocID type: gist_ids/<corpus>/<MODEL_SUFIX>.jsonl
    "TASKS": mair_config.get_all_tasks(),
    "TOTAL_NUM": 0,                                    # launcher: shards per corpus (0 = one per visible GPU, 1 on CPU)
    "PID_START": 0,                                    # launcher, several nodes: this node runs shards
    "PID_END": None,                                   #   PID_START..PID_END (inclusive; None = the last)
    "MERGE_ONLY": False,                               # launcher: only merge the shards (all nodes done)
    "TEMPERATURE": 1.0,                                # the code samples at T=1 (the paper writes argmax)
    "TOP_P": 1.0,
    "MAX_TOKENS": 64,
    "DOC_WORDS": 128,
    "DOC_TOKENS": 300,
    "BACKEND": "auto",
    "BATCH_SIZE": 64,
    "CHUNK_DOCS": 512,
    "GPU_MEMORY_UTILIZATION": None,                    # GPU memory share per vLLM engine; None = vLLM's
                                                       #   default, one engine per GPU; 0.3 = 3 per GPU
    "SEED": 0,
    "DATA_ROOT": mair_config.DATA_ROOT,
    "LOG_DIR": "log",
}

log = logging.getLogger("title_vllm")


def docid_rows(generator, tokenizer, docs, teacher):
    prompts = [lm.chat_prompt_ids(tokenizer, docid_prompt(d["prepared"])) for d in docs]
    outputs = generator.generate(prompts, n=1, temperature=C["TEMPERATURE"], top_p=C["TOP_P"],
                                 max_tokens=C["MAX_TOKENS"], desc="docids")
    rows, fallback = [], 0
    for d, (text,) in zip(docs, outputs):
        ranked = teacher.ranked_terms(d["doc"])
        gist = normalize_docid(text, fill_terms=ranked, doc=d["doc"])
        if not gist:
            gist, fallback = teacher.docid(d["doc"]) or normalize_docid(d["id"]), fallback + 1
        rows.append({"id": d["id"], "gist": gist})
    if fallback:
        log.warning("%d of %d generated DocIDs were empty after normalising; used the extractive teacher",
                    fallback, len(docs))
    return rows


def doc_key(row):
    return row["id"]


def final_path(corpus, model_sufix=None, num_q=None):
    return mair_config.gist_path(corpus, model_sufix or C["MODEL_SUFIX"], C["DATA_ROOT"])


def gen(docs_path, data_name, pid, total_num, model_sufix, model_name, num_q=1):
    """Generate one shard of DocIDs."""
    all_docs = shards.read_docs(docs_path)
    docs = shards.shard_docs(all_docs, pid, total_num)
    out = mair_config.shard_path(final_path(data_name, model_sufix), pid, total_num)
    log.info("%s shard %d/%d: %d documents -> %s", data_name, pid, total_num, len(docs), out)
    teacher = ExtractiveTeacher([d["doc"] for d in all_docs])
    settings = shards.Generation(C["BACKEND"], C["BATCH_SIZE"], C["SEED"], C["GPU_MEMORY_UTILIZATION"],
                                 C["DOC_WORDS"], C["DOC_TOKENS"])
    generator, tokenizer = shards.load_generator(model_name, settings, pid)

    def chunk(batch):
        return docid_rows(generator, tokenizer, shards.prepare_docs(tokenizer, batch, settings), teacher)

    return shards.generate_shard(docs, out, chunk, 1, doc_key, C["CHUNK_DOCS"], desc=f"{data_name} {pid}")


def main(argv=None):
    args = parse_args("title_vllm", C, shards.GEN_FLAGS, argv, __doc__)
    setup_logging()
    model_sufix = args.model_sufix or C["MODEL_SUFIX"]
    model_name = args.model_name or C["MODEL_NAME"]
    if args.num_q not in (None, 1):
        log.warning("-num_q %d ignored: one DocID per document", args.num_q)
    if args.total_num > 0:
        if not args.docs_path or not args.data_name:
            raise SystemExit("shard mode (-total_num > 0) needs -docs_path and -data_name")
        gen(args.docs_path, args.data_name, args.pid, args.total_num, model_sufix, model_name)
        return 0
    C.update(MODEL_SUFIX=model_sufix, MODEL_NAME=model_name)
    run = shards.Launch(C["TASKS"], C["TOTAL_NUM"], C["PID_START"], C["PID_END"], C["MERGE_ONLY"],
                        C["GPU_MEMORY_UTILIZATION"], C["DATA_ROOT"], C["LOG_DIR"])
    flags = ["-model_sufix", model_sufix, "-model_name", model_name, *args.passthrough]
    failed = shards.launch_all(os.path.abspath(__file__), run, flags, final_path, 1, doc_key)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
