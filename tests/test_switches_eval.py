"""Evaluation-side switches for fidelity to the released code, each run both ways on the real code
path: BM25's stemmer and positive-only rankings (baseline and ranking-loss negatives), the
evaluation prompts' instruction cut, prompts without the instruction, title_vllm's DocID normaliser,
and the tables' definitions of Acc@1 and of the MAIR average."""
import logging
import os

import pytest

import bm25
import genir
import lm
import mair_config as mc
import metrics
import quality
import results
import title_vllm
import train_data
from docids import ExtractiveTeacher, normalize_docid
from file_io import read_json, read_jsonl, write_json
from prompts import retrieval_prompt
from small_corpus import write_small_corpus
from test_metrics import _row

TASK = "PyDoc-Net"
TOY_DOCS = [
    {"id": "fruit", "doc": "apple banana apple"},
    {"id": "stone", "doc": "cherry stones and dates"},
    {"id": "run", "doc": "she runs daily"},
    {"id": "stop", "doc": "the the and of"},
    {"id": "more", "doc": "apple pie recipe"},
]
OURS = {"BM25_STEMMER": "english", "BM25_POSITIVE_ONLY": True}
RELEASED = {"BM25_STEMMER": None, "BM25_POSITIVE_ONLY": False}


@pytest.fixture()
def genir_c():
    saved = dict(genir.C)
    yield genir.C
    genir.C.clear()
    genir.C.update(saved)


# ----------------------------------------------------------------------------- BM25: the baseline

def test_bm25_baseline_released_vs_ours(genir_c):
    """Released: no stemming ("running" misses "runs"), the top MAX_RESULTS whatever the score (the
    zero-score documents after the scored ones, in corpus order). Ours: stemmed, scored ones only."""
    queries = [{"qid": "a", "instruction": "", "query": "apple"}, {"qid": "b", "instruction": "", "query": "running"}]
    genir_c.update(MAX_RESULTS=4, BM25_WITH_INSTRUCTION=False, **RELEASED)
    released = genir.bm25_baseline("toy", TOY_DOCS, queries, {})
    genir_c.update(**OURS)
    cache = {}
    ours = genir.bm25_baseline("toy", TOY_DOCS, queries, cache)
    assert cache["toy"].stemmer_name == "english" and cache["toy"].positive_only
    # "apple": fruit (tf 2) then "more"; released fills with stone, run (corpus order), cut at 4
    assert ours["a"] == ["fruit", "more"]
    assert released["a"] == ["fruit", "more", "stone", "run"]
    # "running": only the stemmer finds "runs"; without it every document scores 0, in corpus order
    assert ours["b"] == ["run"]
    assert released["b"] == ["fruit", "stone", "run", "stop"]
    genir_c.update(MAX_RESULTS=100, **RELEASED)
    assert genir.bm25_baseline("toy", TOY_DOCS, queries, {})["a"] == ["fruit", "more", "stone", "run", "stop"]


def test_bm25_fill_keeps_ties_and_corpus_order_on_a_larger_corpus():
    docs = [{"id": f"d{i}", "doc": "alpha beta" if i % 7 == 3 else f"gamma{i}"} for i in range(40)]
    released, ours = bm25.BM25Index(docs, None, False), bm25.BM25Index(docs, None, True)
    scored = ours.search(["alpha"], k=10)[0]
    assert scored == ["d3", "d10", "d17", "d24", "d31", "d38"]
    top = released.search(["alpha"], k=10)[0]
    assert top[:6] == scored and top[6:] == ["d0", "d1", "d2", "d4"]
    assert released.search(["nothing"], k=3) == [["d0", "d1", "d2"]] and ours.search(["nothing"], k=3) == [[]]


# ----------------------------------------------------------------------------- BM25: the negatives

@pytest.fixture(scope="module")
def small_set(tmp_path_factory, demo_root, tiny_model_path):
    tmp = str(tmp_path_factory.mktemp("switches"))
    root = os.path.join(tmp, "data")
    docs = read_jsonl(mc.docs_path(TASK, demo_root))[:30]
    write_small_corpus(root, demo_root, TASK, docs)
    return {"tmp": tmp, "root": root, "docs": docs, "tokenizer": lm.load_tokenizer(tiny_model_path)}


def test_negatives_index_follows_the_switches_and_a_change_rebuilds(small_set, genir_c):
    """train_data's BM25 index (the ranking loss's candidates) is built with the switches, which are
    in the folder's stamp: changing one rebuilds the folder. Released: a group's candidates are the
    top NEGATIVE_DEPTH whatever the score (here the whole corpus); ours: the scored documents only."""
    genir_c.update(DATA_ROOT=small_set["root"], MODEL_DIR=os.path.join(small_set["tmp"], "models"), RUN="t",
                   NUM_Q=2, DOCASQ_N=0, BATCH_SIZE=8, GROUP_SIZE=4, RANK_LOSS=True, NEGATIVE_DEPTH=100, SEED=0)
    tok, docs = small_set["tokenizer"], small_set["docs"]
    corpus = train_data.CorpusFile(mc.docs_path(TASK, small_set["root"]))
    found = {}
    for name, switches in (("ours", OURS), ("released", RELEASED)):
        genir_c.update(**switches)
        data = genir.training_queries(TASK, corpus)
        stamp = data.meta["stamp"]
        assert (stamp["bm25_stemmer"], stamp["bm25_positive_only"]) == tuple(switches.values())
        assert (data.bm25.stemmer_name, data.bm25.positive_only) == tuple(switches.values())  # rebuilt
        _, supplier = genir.training_data(data, tok, genir.rank_token_id(tok))
        queries = [data.row(int(g))["query"] for g in data.groups]
        found[name] = [supplier.candidates(g, q).tolist() for g, q in enumerate(queries)]
        assert found[name] == [t.tolist() for t in bm25.BM25Index(docs, *switches.values()).search_indices(queries, 100)]
    assert all(len(c) == len(docs) for c in found["released"])
    assert any(len(c) < len(docs) for c in found["ours"])
    scored = [t.tolist() for t in bm25.BM25Index(docs, None, True).search_indices(queries, 100)]
    for cands, first in zip(found["released"], scored):  # its scored documents, then the others in corpus order
        assert cands[:len(first)] == first and cands[len(first):] == sorted(set(range(len(docs))) - set(first))


# ----------------------------------------------------------------------------- evaluation prompts

def test_eval_prompts_keep_the_whole_instruction_or_cut_it(tiny_model_path, genir_c):
    tok = lm.load_tokenizer(tiny_model_path)
    instruction = " ".join(f"instruction{i}" for i in range(150))
    query = "how do I close a socket"
    q = [{"qid": "1", "instruction": instruction, "query": query}]
    assert len(tok(instruction, add_special_tokens=False)["input_ids"]) > 64
    genir_c.update(MAX_EVAL_QUERY_TOKENS=128, MAX_INSTRUCTION_TOKENS=64, MAX_EVAL_INSTRUCTION_TOKENS=None)
    whole = genir.eval_prompts(tok, q)[0]
    genir_c.update(MAX_EVAL_INSTRUCTION_TOKENS=64)
    cut = genir.eval_prompts(tok, q)[0]
    assert whole == lm.chat_prompt_ids(tok, retrieval_prompt(instruction, query))
    assert cut == lm.chat_prompt_ids(tok, retrieval_prompt(lm.truncate_tokens(tok, instruction, 64), query))
    assert len(whole) > len(cut) + 40 and "instruction149" in tok.decode(whole) and "instruction149" not in tok.decode(cut)
    # the cut equals the training prompt's (MAX_INSTRUCTION_TOKENS 64)
    assert cut == lm.chat_prompt_ids(tok, train_data.query_prompt(tok, instruction, query, 64, 128))


def test_instruction_in_prompt_off_leaves_the_query_alone_in_training_and_evaluation(tiny_model_path, genir_c):
    tok = lm.load_tokenizer(tiny_model_path)
    row = {"instruction": "Find the function that closes network connections.", "query": "how do I close a socket"}
    genir_c.update(MAX_EVAL_QUERY_TOKENS=128, MAX_INSTRUCTION_TOKENS=64, MAX_EVAL_INSTRUCTION_TOKENS=64,
                   MAX_QUERY_TOKENS=64, MAX_LEN=128)
    prompts, trained = {}, {}
    for on in (True, False):
        genir_c.update(INSTRUCTION_IN_PROMPT=on)
        prompts[on] = genir.eval_prompts(tok, [{"qid": "1", **row}])[0]
        example = train_data.encode(tok, row, "socket close", genir.train_data_settings())
        trained[on] = example["input_ids"][:sum(label == lm.IGNORE_INDEX for label in example["labels"])]
    assert "closes network" in tok.decode(prompts[True]) and trained[True] == prompts[True]
    assert prompts[False] == lm.chat_prompt_ids(tok, row["query"]) and trained[False] == prompts[False]


@pytest.mark.parametrize("setting, message", [
    ("--MAX_EVAL_INSTRUCTION_TOKENS=abc", "MAX_EVAL_INSTRUCTION_TOKENS='abc'"),
    ("--MAX_EVAL_INSTRUCTION_TOKENS=0", "MAX_EVAL_INSTRUCTION_TOKENS=0"),
    ("--BM25_STEMMER=porter", "BM25_STEMMER='porter' is not one of None, 'english'"),
    ("--ACC1=p@2", "ACC1='p@2' is not one of 'p@1', 'ndcg@1'"),
    ("--MAIR_AVERAGE=queries", "MAIR_AVERAGE='queries' is not one of 'domains', 'tasks'"),
])
def test_unknown_switch_values_are_refused(genir_c, setting, message):
    with pytest.raises(SystemExit, match=message):
        genir.main([setting, "--TASKS=PyDoc-Net"])


# ----------------------------------------------------------------------------- DocID post-processing

class FakeGenerator:
    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, n, temperature, top_p, max_tokens, desc):
        assert n == 1 and len(prompts) == len(self.texts)
        return [(t,) for t in self.texts]


def test_docids_raw_first_line_or_normalised(tiny_model_path, monkeypatch, caplog):
    """Released: the DocID is the generated text's first line, stripped; an empty one falls back to
    the extractive teacher, counted. Normalised: docids.normalize_docid (words from the document
    only, filled with its terms, so a blank generation is filled rather than replaced)."""
    tok = lm.load_tokenizer(tiny_model_path)
    docs = [{"id": "a", "doc": "The socket module closes a network connection cleanly."},
            {"id": "b", "doc": "Parse JSON text into Python objects with the json module."},
            {"id": "c", "doc": "Regular expressions match patterns in strings."}]
    docs = [{**d, "prepared": d["doc"]} for d in docs]
    texts = ["  Socket Close: the Connection, Banana!\nsecond line", "json parse", " \n  "]
    teacher = ExtractiveTeacher([d["doc"] for d in docs])
    rows, warned = {}, {}
    for normalise in (False, True):
        monkeypatch.setitem(title_vllm.C, "NORMALIZE_DOCIDS", normalise)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="title_vllm"):
            rows[normalise] = title_vllm.docid_rows(teacher, FakeGenerator(texts), tok, docs)
        warned[normalise] = caplog.text
        assert [r["raw"] for r in rows[normalise]] == texts and [r["id"] for r in rows[normalise]] == ["a", "b", "c"]
    raw, normalised = rows[False], rows[True]
    assert [r["gist"] for r in raw] == ["Socket Close: the Connection, Banana!", "json parse",
                                        teacher.docid(docs[2]["doc"])]
    assert "1 of 3 generated DocIDs were empty; used the extractive teacher" in warned[False]
    assert [r.get("fallback", False) for r in raw] == [False, False, True]  # counted, never made from the id
    assert title_vllm.docid_figures(docs, raw)["fallback_share"] == pytest.approx(1 / 3)
    assert title_vllm.docid_figures(docs, normalised)["fallback_share"] == 0.0
    assert "DocIDs from the fallback" in quality.table([(("c",), None, title_vllm.docid_figures(docs, raw))], ["x"])
    for r, d in zip(normalised, docs):
        assert r["gist"] == normalize_docid(r["raw"], fill_terms=teacher.ranked_terms(d["doc"]), doc=d["doc"])
    assert "were empty" not in warned[True]
    assert "banana" not in normalised[0]["gist"] and "the" not in normalised[0]["gist"].split()
    assert normalised[0]["gist"].startswith("socket connection")  # "close" is not a word of the document
    assert len(normalised[1]["gist"].split()) > 2 and normalised[2]["gist"]  # filled with the document's terms


# ----------------------------------------------------------------------------- metric definitions

# Graded labels: q1's top document has grade 1 of 2 (P@1 = 1, nDCG@1 = 0.5).
QRELS = {"q1": {"d1": 2, "d2": 1}, "q2": {"d3": 1}}
RUN = metrics.run_from_rankings({"q1": ["d2", "d1"], "q2": ["d3"]})
DOMAIN = {"T1": "Code", "T2": "Code", "T3": "Legal"}


def _task_results():
    """T1: the graded run (P@1 1.0, nDCG@1 0.75); T2 and T3: binary qrels, Acc@1 0.5 and 0.0."""
    t1, _ = metrics.evaluate(QRELS, RUN)
    t2, _ = metrics.evaluate({"a": {"x": 1}, "b": {"y": 1}}, metrics.run_from_rankings({"a": ["x"], "b": ["z"]}))
    t3, _ = metrics.evaluate({"a": {"x": 1}}, metrics.run_from_rankings({"a": ["z"]}))
    return {"T1": {"M": t1}, "T2": {"M": t2}, "T3": {"M": t3}}


def test_acc1_and_mair_average_definitions_in_the_tables():
    found = _task_results()
    assert found["T1"]["M"]["Acc@1"] == 1.0 and found["T1"]["M"]["nDCG@1"] == pytest.approx(0.75)
    tables = {(a, m): metrics.results_table(found, DOMAIN, a, m) for a in ("p@1", "ndcg@1") for m in ("domains", "tasks")}
    # T1 T2 T3 | Code avg, Legal avg | MAIR avg
    assert _row(tables["p@1", "domains"], "M") == ["100.0", "50.0", "0.0", "75.0", "0.0", "37.5"]
    assert _row(tables["p@1", "tasks"], "M") == ["100.0", "50.0", "0.0", "75.0", "0.0", "50.0"]
    assert _row(tables["ndcg@1", "domains"], "M") == ["75.0", "50.0", "0.0", "62.5", "0.0", "31.2"]
    assert _row(tables["ndcg@1", "tasks"], "M") == ["75.0", "50.0", "0.0", "62.5", "0.0", "41.7"]
    for (acc1, average), table in tables.items():
        assert metrics.ACC1_DEFINITIONS[acc1][1] in table and metrics.MAIR_AVERAGES[average] in table
    assert "Acc@1 = P@1" in tables["p@1", "domains"] and "Acc@1 = nDCG@1" in tables["ndcg@1", "tasks"]
    assert "mean of the per-domain averages" in tables["p@1", "domains"]
    assert "mean over the MAIR tasks" in tables["p@1", "tasks"]
    ndcg10 = metrics.results_table(found, DOMAIN, "ndcg@1", "tasks", metric="nDCG@10")
    assert "Acc@1 =" not in ndcg10 and metrics.MAIR_AVERAGES["tasks"] in ndcg10


def test_write_results_and_ablation_name_the_definitions(tmp_path):
    found = _task_results()
    settings = {"DECODE_MODE": "reverse_annealed", "K": 100, "MAX_RESULTS": 100}
    for task, by_method in found.items():
        write_json({"task": task, "corpus": task, "domain": DOMAIN[task], "methods": by_method, "settings": settings},
                   str(tmp_path / task / "metrics.json"))
    text = {}
    for acc1, average in (("p@1", "domains"), ("ndcg@1", "tasks")):
        path = results.write_results(str(tmp_path), list(DOMAIN), "r", ["M"], acc1, average)
        text[acc1] = open(path, encoding="utf-8").read()
        assert metrics.ACC1_DEFINITIONS[acc1][1] in text[acc1] and metrics.MAIR_AVERAGES[average] in text[acc1]
    acc_table = {a: t.split("## ")[1] for a, t in text.items()}
    assert _row(acc_table["p@1"], "M")[-1] == "37.5" and _row(acc_table["ndcg@1"], "M")[-1] == "41.7"
    _, per_query = metrics.evaluate(QRELS, RUN)
    other = {k: dict(v, q1=0.0) for k, v in per_query.items()}
    for acc1, expected in (("p@1", "100.0"), ("ndcg@1", "75.0")):
        path = results.write_ablation(str(tmp_path), "r", ["T1"], {"reverse_annealed": per_query, "greedy": other},
                                      "reverse_annealed", "K=100", [1.0, 1.5], acc1)
        table = open(path, encoding="utf-8").read()
        assert _row(table, "reverse_annealed (ref)")[0].startswith(expected)
        assert metrics.ACC1_DEFINITIONS[acc1][1] in table
        stored = read_json(str(tmp_path / "ablation_per_query.json"))["reverse_annealed"]["Acc@1"]
        assert stored == ({"q1": 1.0, "q2": 1.0} if acc1 == "p@1" else {"q1": 0.5, "q2": 1.0})


def test_shipped_configs_set_the_switches():
    demo = read_json(os.path.join(os.path.dirname(genir.__file__), "configs", "demo.json"))
    assert {k: demo["genir"][k] for k in ("BM25_STEMMER", "BM25_POSITIVE_ONLY", "MAX_EVAL_INSTRUCTION_TOKENS",
                                          "INSTRUCTION_IN_PROMPT", "ACC1", "MAIR_AVERAGE")} == \
        {"BM25_STEMMER": "english", "BM25_POSITIVE_ONLY": True, "MAX_EVAL_INSTRUCTION_TOKENS": 64,
         "INSTRUCTION_IN_PROMPT": False, "ACC1": "p@1", "MAIR_AVERAGE": "domains"}
    assert demo["title_vllm"]["NORMALIZE_DOCIDS"] is True
    # the released code's behaviour is the default
    assert (genir.C["BM25_STEMMER"], genir.C["BM25_POSITIVE_ONLY"], genir.C["MAX_EVAL_INSTRUCTION_TOKENS"],
            genir.C["INSTRUCTION_IN_PROMPT"], genir.C["ACC1"], genir.C["MAIR_AVERAGE"],
            title_vllm.C["NORMALIZE_DOCIDS"]) == (None, False, None, True, "p@1", "domains", False)
