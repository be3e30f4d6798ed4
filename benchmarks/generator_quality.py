"""Generator quality you can read without a GPU: the demo's tiny generators, SmolLM2-135M-Instruct
zero-shot (no fine-tuning; the prompts ask for the reply only) and SmolLM2 after a short SFT on the
demo training tasks, on the same documents of each evaluation corpus. Writes the comparison into
README.md (between the generator-quality markers) and OUT/generator_quality.json.

    make real-model && python -m benchmarks.generator_quality     # about 75 minutes on 2 CPU cores

Every step is a pipeline script in its own process with a config file, as a user runs it, so the
figures are the ones qg_vllm.py / title_vllm.py write beside their outputs (quality.py). Finished
steps are reused on a rerun (delete OUT to start over).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time

import mair_config as mc
import quality
from file_io import atomic_open, read_json, read_jsonl, write_json, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["PyDoc-Net", "PyCode-Dev"]
TRAIN_TASKS = ["PyDoc-Sys", "PyCode-Text"]
SMOL = "models/SmolLM2-135M-Instruct"
GENERATORS = ["tiny (demo SFT)", "SmolLM2 zero-shot", "SmolLM2 + short SFT"]
MARKERS = ("<!-- generator-quality:start -->", "<!-- generator-quality:end -->")


def run_step(name, script, settings, out, log):
    """`python <script> --config <file>` with `settings` as the script's section; timed and logged."""
    path = os.path.join(out, "configs", f"{name}.json")
    write_json({script[:-3]: settings}, path)
    started = time.time()
    with open(os.path.join(out, "logs", f"{name}.log"), "a") as f:
        code = subprocess.call([sys.executable, script, "--config", path], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    seconds = round(time.time() - started)
    log[name] = seconds
    print(f"{name}: {seconds} s (exit {code})", flush=True)
    if code:
        raise SystemExit(f"{name} failed: see {out}/logs/{name}.log")


def sample_corpora(data, n_docs, seed):
    """The same `n_docs` documents of each evaluation corpus (a seeded sample), with the task's
    queries file (the generators read its instruction)."""
    for task in TASKS:
        if os.path.exists(mc.docs_path(task, data)):
            continue
        docs = read_jsonl(mc.docs_path(task))
        docs = random.Random(seed).sample(docs, min(n_docs, len(docs)))
        write_jsonl(read_jsonl(mc.queries_path(task)), mc.queries_path(task, data))
        write_jsonl(docs, mc.docs_path(task, data))


def generators(out, sft_examples, log):
    """{name: (query generator, DocID generator, zero-shot prompts)}, training what is missing."""
    if not os.path.exists("models/tiny-qg/training_complete.json") or \
            not os.path.exists("models/tiny-id/training_complete.json"):
        for script in ("sftqg.py", "sftid.py"):
            subprocess.check_call([sys.executable, script, "--config", "configs/demo.json"], cwd=ROOT)
    sft = {"BASE_MODEL": SMOL, "TRAIN_TASKS": TRAIN_TASKS, "MAX_EXAMPLES": sft_examples, "LR": 1e-4,
           "WARMUP_STEPS": 10, "EPOCHS": 1, "BATCH_SIZE": 8, "MAX_LEN": 320, "MAX_DOC_TOKENS": 96,
           "WEIGHT_DECAY": 0.0, "PRECISION": "bf16"}
    smol_qg, smol_id = os.path.join(out, "smol-qg"), os.path.join(out, "smol-id")
    run_step("sftqg-smol", "sftqg.py", {**sft, "OUT_DIR": smol_qg, "SFT_DATA": os.path.join(out, "sft-qg.jsonl")},
             out, log)
    run_step("sftid-smol", "sftid.py", {**sft, "OUT_DIR": smol_id, "SFT_DATA": os.path.join(out, "sft-id.jsonl")},
             out, log)
    return dict(zip(GENERATORS, [("models/tiny-qg", "models/tiny-id", False), (SMOL, SMOL, True),
                                 (smol_qg, smol_id, False)]))


def measure(out, data, name, qg_model, id_model, zero_shot, num_q, log):
    """Pseudo-queries and DocIDs of every sampled document; {corpus: {"queries": ..., "docids": ...}}."""
    slug = "".join(c for c in name.lower() if c.isalnum())
    common = {"TASKS": TASKS, "DATA_ROOT": data, "TOTAL_NUM": 1, "QUALITY_DOCS": 0, "ZERO_SHOT": zero_shot,
              "MAX_TOKENS": 32, "BATCH_SIZE": 32, "LOG_DIR": os.path.join(out, "logs")}
    run_step(f"qg-{slug}", "qg_vllm.py", {**common, "MODEL_NAME": qg_model, "MODEL_SUFIX": f"QG{slug}",
                                          "NUM_Q": num_q}, out, log)
    run_step(f"docid-{slug}", "title_vllm.py", {**common, "MODEL_NAME": id_model, "MODEL_SUFIX": slug,
                                                 "NORMALIZE_DOCIDS": True}, out, log)
    return figures_on_disk(data, name, num_q)


def figures_on_disk(data, name, num_q):
    """{corpus: {"queries": ..., "docids": ...}} of a generator, from the reports its outputs left
    (None where a report is missing)."""
    slug = "".join(c for c in name.lower() if c.isalnum())
    reports = {}
    for corpus in mc.corpora_of(TASKS):
        paths = {"queries": mc.pseudo_queries_path(corpus, f"QG{slug}", num_q, data),
                 "docids": mc.gist_path(corpus, slug, data)}
        reports[corpus] = {k: quality.read_report(p) for k, p in paths.items()}
    return reports


def table(results, n_docs, num_q):
    """Markdown: one row per generator and corpus, then what the figures mean."""
    rows = [((name, corpus), f["queries"], f["docids"]) for name, by_corpus in results.items()
            for corpus, f in by_corpus.items()]
    first = next(r for r in rows if r[1] and r[2])  # the definitions travel with every report
    notes = [f"{n_docs} documents per corpus (the same for every generator), {num_q} pseudo-queries each, "
             "sampled at temperature 1; DocIDs: raw = generated text, final = after the format normaliser.",
             *(f"{what} {k.replace('_', ' ')}: {v}." for what, report in (("query", first[1]), ("DocID", first[2]))
               for k, v in report["definitions"].items())]
    if not all(q and d for _, q, d in rows):
        notes.append("-: not measured yet (`python -m benchmarks.generator_quality` resumes the run where it stopped).")
    return quality.table(rows, ["generator", "corpus"]) + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def write_readme(text, readme=os.path.join(ROOT, "README.md")):
    body = open(readme, encoding="utf-8").read()
    start, end = body.index(MARKERS[0]) + len(MARKERS[0]), body.index(MARKERS[1])
    with atomic_open(readme) as f:
        f.write(body[:start] + "\n" + text + body[end:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200, help="documents per evaluation corpus")
    parser.add_argument("--num-q", type=int, default=4, help="pseudo-queries per document")
    parser.add_argument("--sft-examples", type=int, default=480, help="SmolLM2 SFT rows per generator (~15 min each)")
    parser.add_argument("--out", default="out/generator_quality")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.md's table")
    parser.add_argument("--table-only", action="store_true", help="rewrite README.md's table from OUT's saved figures")
    args = parser.parse_args(argv)
    saved = os.path.join(ROOT, args.out, "generator_quality.json")
    if args.table_only:  # from the saved run, or from what a run still going has finished ("-": not yet)
        run = read_json(saved) if os.path.exists(saved) else {
            "docs": args.docs, "num_q": args.num_q,
            "results": {name: figures_on_disk(os.path.join(ROOT, args.out, "data"), name, args.num_q)
                        for name in GENERATORS}}
        write_readme(table(run["results"], run["docs"], run["num_q"]))
        return 0
    if not os.path.exists(os.path.join(ROOT, SMOL, "conversion.json")):
        raise SystemExit(f"{SMOL} is missing: run `make real-model` first")
    out, data = os.path.join(ROOT, args.out), os.path.join(ROOT, args.out, "data")
    for sub in ("configs", "logs"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    log = {}
    sample_corpora(data, args.docs, seed=0)
    results = {name: measure(out, data, name, *models, args.num_q, log)
               for name, models in generators(out, args.sft_examples, log).items()}
    text = table(results, args.docs, args.num_q)
    write_json({"results": results, "seconds": log, "docs": args.docs, "num_q": args.num_q,
                "sft_examples": args.sft_examples}, saved)
    print(text)
    print("step times (s):", json.dumps(log))
    if not args.no_readme:
        write_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
