"""A real pretrained model (SmolLM2-135M-Instruct: ChatML template, its own vocabulary, no Llama-3
tokens) through the five scripts, run as a user runs them, on 24 documents of a demo corpus."""
import os
import subprocess
import sys

import pytest

import lm
import mair_config as mc
from file_io import read_json, read_jsonl, write_json, write_jsonl
from prefix_tree import PrefixTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK, TRAIN_TASK = "PyDoc-Net", "PyDoc-Sys"
N_DOCS, NUM_Q = 24, 2
RANK_TOKEN = "<|reserved_special_token_0|>"


@pytest.fixture(scope="session")
def smol_path(demo_root):
    """models/SmolLM2-135M-Instruct, fetched and converted (make real-model) when missing."""
    from models import get_smollm2
    if not os.path.exists(os.path.join(get_smollm2.OUT_DIR, get_smollm2.DONE)):
        assert get_smollm2.main([]) == 0, "make real-model failed: see its message above"
    return get_smollm2.OUT_DIR


def _small_task(task, root, demo_root):
    docs = read_jsonl(mc.docs_path(task, demo_root))[:N_DOCS]
    ids = {d["id"] for d in docs}
    queries = [q for q in read_jsonl(mc.queries_path(task, demo_root)) if all(lab["id"] in ids for lab in q["labels"])]
    write_jsonl(docs, mc.docs_path(task, root))
    write_jsonl(queries, mc.queries_path(task, root))
    return docs, queries


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, demo_root, smol_path):
    """The five scripts in order, each a fresh process with one config file, as in `make demo`."""
    tmp = tmp_path_factory.mktemp("smol")
    root = str(tmp / "data")
    docs, queries = _small_task(TASK, root, demo_root)
    _small_task(TRAIN_TASK, root, demo_root)
    sft = {"BASE_MODEL": smol_path, "TRAIN_TASKS": [TRAIN_TASK], "DATA_ROOT": root, "MAX_EXAMPLES": 24,
           "LR": 1e-4, "WARMUP_STEPS": 0, "EPOCHS": 1, "BATCH_SIZE": 8, "MAX_LEN": 160, "MAX_DOC_TOKENS": 64,
           "MAX_STEPS": None, "WEIGHT_DECAY": 0.01, "PRECISION": "bf16"}  # the released switches, set explicitly
    generate = {"TASKS": [TASK], "TOTAL_NUM": 1, "DATA_ROOT": root, "MAX_TOKENS": 24, "BATCH_SIZE": 24,
                "LOG_DIR": str(tmp / "log")}
    config = {
        "sftqg": {**sft, "OUT_DIR": str(tmp / "qg"), "SFT_DATA": str(tmp / "qg.jsonl"), "EVAL_TASKS": [TASK],
                  "ALLOW_EVAL_OVERLAP": False},
        "qg_vllm": {**generate, "MODEL_NAME": str(tmp / "qg"), "NUM_Q": NUM_Q, "ZERO_SHOT": False},
        "sftid": {**sft, "OUT_DIR": str(tmp / "id"), "SFT_DATA": str(tmp / "id.jsonl")},
        "title_vllm": {**generate, "MODEL_NAME": str(tmp / "id"), "NORMALIZE_DOCIDS": False, "ZERO_SHOT": False},
        "genir": {"BASE_MODEL": smol_path, "MODEL_DIR": str(tmp / "retriever"), "OUT_DIR": str(tmp / "out"),
                  "RUN": "smol", "TASKS": [TASK], "DATA_ROOT": root, "NUM_Q": NUM_Q, "DOCASQ_N": 1,
                  "DOCASQ_WORDS": 16, "LR": 1e-4, "WARMUP_RATIO": 0.0, "EPOCHS": 1, "BATCH_SIZE": 8,
                  "MAX_LEN": 128, "RANK_EVERY": 4, "GROUP_SIZE": 4, "RANK_TOKEN": RANK_TOKEN, "K": 10,
                  "MAX_RESULTS": 10, "EVAL_BATCH_SIZE": 16, "KEEP_CHECKPOINTS": 1, "DROP_NO_POSITIVE": False,
                  "DOCID_COLLISION_WARN": 0.5, "WEIGHT_DECAY": 0.01, "PRECISION": "bf16", "RANKNET_MODE": "released",
                  "EVAL_EVERY_EPOCH": True, "NUM_PSEUDO": None, "DOCASQ_MODE": "random", "MAX_STEPS": None,
                  "DOCASQ_REDRAW": False, "QUERY_FILTER": None,
                  "BM25_STEMMER": None, "BM25_POSITIVE_ONLY": False, "MAX_EVAL_INSTRUCTION_TOKENS": None,
                  "INSTRUCTION_IN_PROMPT": True, "ACC1": "p@1", "MAIR_AVERAGE": "domains"},
    }
    path = str(tmp / "smol.json")
    write_json(config, path)
    for script in ("sftqg.py", "qg_vllm.py", "sftid.py", "title_vllm.py", "genir.py"):
        run = subprocess.run([sys.executable, script, "--config", path], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, f"{script}:\n{run.stderr[-3000:]}"
    return {"tmp": tmp, "root": root, "docs": docs, "queries": queries, "config": config}


def test_pseudo_queries_and_docids_for_every_document(pipeline):
    root, ids = pipeline["root"], [d["id"] for d in pipeline["docs"]]
    rows = read_jsonl(mc.pseudo_queries_path(TASK, "QG", NUM_Q, root))
    per_doc = {}
    for row in rows:
        per_doc.setdefault(row["labels"][0]["id"], []).append(row["query"])
    assert sorted(per_doc) == sorted(ids) and all(len(q) == NUM_Q for q in per_doc.values())
    assert sum(bool(q.strip()) for qs in per_doc.values() for q in qs) >= 0.9 * len(rows)
    gists = {r["id"]: r["gist"] for r in read_jsonl(mc.gist_path(TASK, root=root))}
    assert sorted(gists) == sorted(ids) and all(g.strip() for g in gists.values())
    figures = read_json(mc.pseudo_queries_path(TASK, "QG", NUM_Q, root)[:-len(".jsonl")] + ".quality.json")
    assert figures["queries"] == len(rows) and 0 <= figures["self_retrieval"] <= 1


def test_trie_leaves_decode_back_to_the_docids(pipeline):
    retriever = os.path.join(pipeline["tmp"], "retriever", "smol", TASK)
    tok = lm.load_tokenizer(retriever)
    tree = PrefixTree.load(os.path.join(retriever, "trie"))
    gists = {r["id"]: r["gist"] for r in read_jsonl(mc.gist_path(TASK, root=pipeline["root"]))}
    seen = []
    for leaf in range(tree.n_leaves):
        path = tree.leaf_tokens(leaf)
        assert path[-1] == tok.eos_token_id
        for doc_id in tree.leaf_docs(leaf):
            full = tok(gists[doc_id], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert full[:len(path) - 1] == path[:-1]  # a leaf keeps a (shortest unique) prefix of its DocID
            seen.append(doc_id)
    assert sorted(seen) == sorted(gists)


def test_rank_token_round_trips_through_the_saved_retriever(pipeline):
    retriever = os.path.join(pipeline["tmp"], "retriever", "smol", TASK)
    model, tok = lm.load_model(retriever)
    token_id = tok.convert_tokens_to_ids(RANK_TOKEN)
    assert token_id == 49152  # SmolLM2 lacks it: appended after its 49,152 tokens
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == 49153
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_evaluation_writes_its_tables(pipeline):
    out = os.path.join(pipeline["tmp"], "out", "smol")
    text = open(os.path.join(out, "results.md"), encoding="utf-8").read()
    for name in ("BM25", "ZeroGR", "ZeroGR (reranked)", TASK):
        assert name in text
    result = read_json(os.path.join(out, TASK, "metrics.json"))
    assert result["queries"] == len(pipeline["queries"]) > 0
    assert 0 <= result["methods"]["ZeroGR"]["Acc@1"] <= 1
    quality = result["generator_quality"]  # copied from what qg_vllm.py and title_vllm.py wrote
    assert quality["queries"]["documents"] == N_DOCS and quality["docids"]["final"]["documents"] == N_DOCS
    assert "## Generator quality" in text


@pytest.mark.parametrize("model", ["tiny", "smol"])
def test_max_len_cuts_the_prompt_not_the_answer(model, tiny_model_path, smol_path):
    tok = lm.load_tokenizer(tiny_model_path if model == "tiny" else smol_path)
    prompt = " ".join(f"word{i}" for i in range(200))
    whole = lm.encode_example(tok, prompt, "socket close shutdown", 10_000)
    cut = lm.encode_example(tok, prompt, "socket close shutdown", 80)
    answer = [t for t in whole["labels"] if t != lm.IGNORE_INDEX]
    assert len(whole["input_ids"]) > 80 and len(cut["input_ids"]) == 80
    assert [t for t in cut["labels"] if t != lm.IGNORE_INDEX] == answer
    assert cut["input_ids"][:10] == whole["input_ids"][:10]  # the template's head is kept too
    assert tok.decode(answer).startswith("socket close shutdown")
