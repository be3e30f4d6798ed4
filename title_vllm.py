"""Step 4: write a keyword DocID for every document with the DocID generator.

Shard mode:
    python title_vllm.py -pid 0 -total_num 8 -docs_path dataset/MAIR-Docs/SciFact/docs.jsonl \
        -data_name SciFact -model_name models/Llama-3.2-1B-Instruct-ID
    -> dataset/MAIR-Data/gist_ids/SciFact/title-0-8.jsonl
Launcher mode (`-total_num 0`, the default): the shards of every corpus of TASKS on the visible
GPUs, one process per GPU at a time, merged into dataset/MAIR-Data/gist_ids/<corpus>/title.jsonl
(`{"id", "gist", "raw"}` per document, `raw` being the generated text);
several nodes as in qg_vllm.py (PID_START, PID_END, MERGE_ONLY). DocID figures (quality.py) go to
<MODEL_SUFIX>.quality.json beside the merged file.

The DocID is the generated text's first line, stripped, as in the released code; with the switch
NORMALIZE_DOCIDS it goes through the format normaliser (docids.py) instead, which also drops words
that do not come from the document and fills a DocID shorter than 6 words with the document's most
distinctive terms. Either way, a DocID that comes out empty is replaced by the extractive teacher's
DocID and counted.
"""
import functools
import logging
import sys

import lm
import mair_config
import quality
import shards
from config import declared, parse_args, setup_logging
from data import read_docs
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
    "ZERO_SHOT": False,                                # True: a model not fine-tuned (asked for the reply only)
    "SEED": 0,
    "QUALITY_DOCS": 2000,                              # documents whose DocIDs are scored (quality.py; 0 = all)
    "NORMALIZE_DOCIDS": False,                         # False: the DocID is the generated text's first line
                                                       #   (released); True: docids.normalize_docid's format rules
    "DATA_ROOT": mair_config.DATA_ROOT,
    "LOG_DIR": "log",
}

log = logging.getLogger("title_vllm")


def first_line(text):
    """The released code's DocID: the generated text stripped, its first line."""
    lines = str(text).strip().splitlines()
    return lines[0].strip() if lines else ""


def docid_rows(teacher, generator, tokenizer, docs):
    prompts = [lm.chat_prompt_ids(tokenizer, docid_prompt(d["prepared"], zero_shot=C["ZERO_SHOT"])) for d in docs]
    outputs = generator.generate(prompts, n=1, temperature=C["TEMPERATURE"], top_p=C["TOP_P"],
                                 max_tokens=C["MAX_TOKENS"], desc="docids")
    rows, fallback = [], 0
    for d, (text,) in zip(docs, outputs):
        if C["NORMALIZE_DOCIDS"]:
            gist = normalize_docid(text, fill_terms=teacher.ranked_terms(d["doc"]), doc=d["doc"])
        else:
            gist = first_line(text)
        fell_back = not gist  # the extractive teacher's DocID from the text; never one made from the document id
        if fell_back:
            gist, fallback = teacher.docid(d["doc"]), fallback + 1
        rows.append({"id": d["id"], "gist": gist, "raw": text, **({"fallback": True} if fell_back else {})})
    if fallback:
        log.warning("%d of %d generated DocIDs were empty%s; used the extractive teacher", fallback, len(docs),
                    " after normalising" if C["NORMALIZE_DOCIDS"] else "")
    return rows


def output(model_sufix):
    """One DocID per document (`gist`; `raw`: the generated text), in gist_ids/<corpus>/<MODEL_SUFIX>.jsonl."""
    return shards.Output(lambda corpus: mair_config.gist_path(corpus, model_sufix, C["DATA_ROOT"]), 1,
                         lambda row: row["id"], figures=docid_figures, what="DocID")


def docid_figures(docs, rows):
    """DocID figures (quality.py) of the scored documents' rows, on the raw and the final text."""
    return quality.docid_report(docs, {str(r["id"]): r.get("raw", r["gist"]) for r in rows},
                                {str(r["id"]): r["gist"] for r in rows},
                                {str(r["id"]) for r in rows if r.get("fallback")})


def gen(docs_path, data_name, pid, total_num, model_sufix, model_name):
    """Generate one shard of DocIDs."""
    docs = read_docs(docs_path)
    teacher = ExtractiveTeacher([d["doc"] for d in docs])
    return shards.run_shard(__file__, declared(shards.Generation, C), docs, data_name, pid, total_num, model_name,
                            output(model_sufix),
                            functools.partial(docid_rows, teacher))


def main(argv=None):
    args = parse_args("title_vllm", C, shards.GEN_FLAGS, argv, __doc__)
    setup_logging()
    model_sufix = args.model_sufix or C["MODEL_SUFIX"]
    model_name = args.model_name or C["MODEL_NAME"]
    if args.num_q not in (None, 1):
        log.warning("-num_q %d ignored: one DocID per document", args.num_q)
    flags = ["-model_sufix", model_sufix, "-model_name", model_name]
    shard = functools.partial(gen, model_sufix=model_sufix, model_name=model_name)
    return shards.run(__file__, declared(shards.Launch, C), args, shard, output(model_sufix), flags)


if __name__ == "__main__":
    sys.exit(main())
