"""Faults and bad input in evaluation: broken trie caches are named and rebuilt, degenerate DocIDs,
queries without a relevant label and short rankings are reported, stale failure records go."""
import json
import logging
import os

import numpy as np
import pytest

import genir
import mair_config as mc
import metrics
import prefix_tree
import quality
import results
from data import qrels_from_queries
from file_io import read_json, read_jsonl, write_jsonl
from prefix_tree import PrefixTree, TrieCacheError
from test_genir import _settings

END = 99
SEQS = {"a": [1, 2], "b": [1, 3], "c": [4], "d": [4, 5, 6], "e": [7]}


@pytest.fixture()
def settings(tmp_path):
    saved = dict(genir.C)
    genir.C.update(MODEL_DIR=str(tmp_path / "models"), OUT_DIR=str(tmp_path / "out"), RUN="t")
    yield genir.C
    genir.C.clear()
    genir.C.update(saved)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 8])


FAULTS = {
    "truncated": ("edge_key.npy", _truncate),
    "emptied": ("leaf_doc_ptr.npy", lambda path: path.write_bytes(b"")),
    "missing": ("child_ptr.npy", os.remove),
    "wrong dtype": ("leaf_count.npy", lambda path: np.save(path, np.load(path).astype(np.float32))),
    "wrong shape": ("leaf_node.npy", lambda path: np.save(path, np.load(path).reshape(1, -1))),
    "short array": ("doc_id_ptr.npy", lambda path: np.save(path, np.load(path)[:-1])),
    "meta unreadable": ("meta.json", lambda path: path.write_text('{"format": 2, "end_id"')),
    "meta incomplete": ("meta.json", lambda path: path.write_text(json.dumps({"format": 2}))),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_broken_trie_cache_is_an_error_naming_the_file(tmp_path, fault):
    name, damage = FAULTS[fault]
    PrefixTree.from_token_ids(SEQS.items(), END).save(tmp_path / "trie")
    damage(tmp_path / "trie" / name)
    with pytest.raises(TrieCacheError, match=str(tmp_path / "trie" / name)):
        PrefixTree.load(tmp_path / "trie")


def test_load_trie_rebuilds_a_broken_cache_with_a_warning(settings, tiny_model_path, caplog):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    docs = [{"id": k} for k in SEQS]
    gists = {k: f"gist {k} words" for k in SEQS}
    first = genir.load_trie("C", tokenizer, docs, gists)
    cache = os.path.join(genir.model_dir("C"), "trie")
    with caplog.at_level(logging.WARNING, "genir"):
        assert genir.load_trie("C", tokenizer, docs, gists).source == first.source
        assert not caplog.records
        open(os.path.join(cache, "edge_key.npy"), "r+b").truncate(20)
        rebuilt = genir.load_trie("C", tokenizer, docs, gists)
    assert any(os.path.join(cache, "edge_key.npy") in r.getMessage() and "rebuilding" in r.getMessage()
               for r in caplog.records)
    assert [rebuilt.leaf_docs(i) for i in range(rebuilt.n_leaves)] == \
        [first.leaf_docs(i) for i in range(first.n_leaves)]
    assert PrefixTree.load(cache).source == first.source  # the cache was written again
    gists["a"] = "another gist"
    assert genir.load_trie("C", tokenizer, docs, gists).source != first.source  # changed DocIDs: rebuilt


def test_a_failed_save_keeps_the_old_cache_and_no_temporary_files(tmp_path, monkeypatch):
    tree = PrefixTree.from_token_ids(SEQS.items(), END)
    tree.source = "old"
    tree.save(tmp_path / "trie")
    saved = []

    def failing_save(path, array):
        if len(saved) == 3:
            raise OSError("disk full")
        saved.append(path)
        with open(path, "wb") as f:
            np.lib.format.write_array(f, array)

    monkeypatch.setattr(prefix_tree.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        tree.source = "new"
        tree.save(tmp_path / "trie")
    assert os.listdir(tmp_path) == ["trie"]
    assert PrefixTree.load(tmp_path / "trie").source == "old"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_trie_directory_gets_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        PrefixTree.from_token_ids(SEQS.items(), END).save(tmp_path / "trie")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "trie").st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(tmp_path / "trie" / "meta.json").st_mode & 0o777 == 0o666 & ~umask


def test_degenerate_docids_are_warned_with_rate_and_distinct_count(settings):
    same = PrefixTree.from_token_ids([(k, [5, 6]) for k in SEQS], END)
    [warning] = quality.docid_collisions("C", same, 0.5)
    assert "100% of 5 documents" in warning and "1 distinct DocIDs" in warning
    half = PrefixTree.from_token_ids([("a", [1]), ("b", [1]), ("c", [2]), ("d", [3])], END)
    assert quality.docid_collisions("C", half, 0.5) == []  # 50%: at the threshold, not above
    assert "50% of 4 documents" in quality.docid_collisions("C", half, 0.4)[0]
    assert quality.docid_collisions("C", PrefixTree.from_token_ids(SEQS.items(), END), 0.5) == []


def test_queries_without_a_relevant_label_are_counted_kept_or_dropped():
    rows = [{"qid": "1", "query": "x", "labels": [{"id": "d1", "score": 1}]},
            {"qid": "2", "query": "y", "labels": [{"id": "d2", "score": 0}]}]
    kept, report = qrels_from_queries(rows)
    assert set(kept) == {"1", "2"} and report["no_relevant"] == 1 and report["no_relevant_dropped"] == 0
    assert "each scores 0 in every average" in metrics.qrels_notes("T", report)[0]
    dropped, report = qrels_from_queries(rows, drop_no_relevant=True)
    assert set(dropped) == {"1"} and report["no_relevant"] == 1 and report["no_relevant_dropped"] == 1
    assert "left out of the qrels" in metrics.qrels_notes("T", report)[0]
    run = {"1": {"d1": 1.0}, "2": {"d2": 1.0}}
    assert metrics.evaluate(kept, run)[0]["Acc@1"] == 0.5 and metrics.evaluate(dropped, run)[0]["Acc@1"] == 1.0


def test_rankings_shorter_than_a_cutoff_are_noted_under_its_table():
    results = {"T1": {"M": {"Acc@1": 0.5, "nDCG@10": 0.5, "R@100": 0.5}},
               "T2": {"M": {"Acc@1": 0.5, "nDCG@10": 0.5, "R@100": 0.5}}}
    limits = [("ZeroGR decoded at most K=10 DocIDs per query", 10, ["T1", "T2"]),
              ("every method returned at most MAX_RESULTS=5 documents per query", 5, ["T2"])]
    tables = metrics.results_tables(results, {"T1": "Code", "T2": "Code"}, "p@1", "domains",
                                    limits=limits).split("## ")[1:]
    acc, ndcg, recall = tables
    assert "counts up to" not in acc
    assert "nDCG@10 counts up to 10 ranks, but every method returned at most MAX_RESULTS=5 documents per " \
           "query on T2." in ndcg and "K=10" not in ndcg
    assert "R@100 counts up to 100 ranks, but ZeroGR decoded at most K=10 DocIDs per query." in recall
    assert "MAX_RESULTS=5 documents per query on T2." in recall


def test_failure_records_keep_only_what_still_stands(settings):
    path = os.path.join(genir.run_dir(), "failures.json")
    results.write_failures(genir.run_dir(), "all", {"A": "training: DataError: x", "T": "evaluation: RuntimeError: y"})
    results.write_failures(genir.run_dir(), "train", {})  # a training rerun leaves the evaluation failure standing
    assert read_json(path) == {"T": "evaluation: RuntimeError: y"}
    results.write_failures(genir.run_dir(), "eval", {"U": "evaluation: DataError: z"})
    assert read_json(path) == {"U": "evaluation: DataError: z"}
    results.write_failures(genir.run_dir(), "all", {})
    assert not os.path.exists(path)


# ----------------------------------------------------------------------------- one small real run

GIST = "python standard library function"  # every document's DocID: degenerate


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_root, tiny_model_path):
    """PyDoc-Net cut to 8 documents that all share one DocID, one query whose labels all score 0;
    trained 1 epoch, K=10. The first run fails (training) on a malformed query file, the second succeeds."""
    tmp = str(tmp_path_factory.mktemp("faults_eval"))
    root = os.path.join(tmp, "data")
    task = "PyDoc-Net"
    docs = read_jsonl(mc.docs_path(task, demo_root))[:8]
    ids = {d["id"] for d in docs}
    queries = [q for q in read_jsonl(mc.queries_path(task, demo_root)) if all(lab["id"] in ids for lab in q["labels"])]
    queries.append({"qid": "zero", "instruction": queries[0]["instruction"], "query": "send an e-mail",
                    "labels": [{"id": docs[0]["id"], "score": 0}]})
    write_jsonl(docs, mc.docs_path(task, root))
    write_jsonl([{"id": d["id"], "gist": GIST} for d in docs], mc.gist_path(task, root=root))
    write_jsonl([{"instruction": q["instruction"], "query": q["query"], "labels": q["labels"]} for q in queries[:-1]],
                mc.pseudo_queries_path(task, "QG", 2, root))
    saved = dict(genir.C)
    genir.C.update(_settings(root, tmp, tiny_model_path))
    genir.C.update(TASKS=[task], EPOCHS=1, K=10, RERANK=False, LR=1e-3)
    qpath = mc.queries_path(task, root)
    os.makedirs(os.path.dirname(qpath))
    with open(qpath, "w", encoding="utf-8") as f:
        f.write("not json\n")
    failed = genir.main([])
    failures = read_json(os.path.join(genir.run_dir(), "failures.json"))
    write_jsonl(queries, qpath)
    code = genir.main([])
    yield {"tmp": tmp, "root": root, "task": task, "failed": failed, "failures": failures, "code": code,
           "settings": dict(genir.C)}
    genir.C.clear()
    genir.C.update(saved)


def test_a_successful_rerun_removes_the_failure_record(run):
    assert run["failed"] == 1 and list(run["failures"]) == [run["task"]]
    failure = run["failures"][run["task"]]
    assert failure.startswith("training: DataError") and "queries.jsonl:1" in failure
    out = os.path.join(run["settings"]["OUT_DIR"], "t")
    assert run["code"] == 0 and os.path.exists(os.path.join(out, "results.md"))
    assert not os.path.exists(os.path.join(out, "failures.json"))


def test_degenerate_docids_no_relevant_queries_and_short_rankings_reach_metrics_and_results(run):
    out = os.path.join(run["settings"]["OUT_DIR"], "t")
    result = read_json(os.path.join(out, run["task"], "metrics.json"))
    assert result["qrels_report"]["no_relevant"] == 1 and result["queries"] == 9
    text = open(os.path.join(out, "results.md"), encoding="utf-8").read()
    for note in ("degenerate DocIDs: 100% of 8 documents share their DocID", "1 distinct DocIDs",
                 "1 queries have no relevant label (every label scores 0): each scores 0 in every average"):
        assert any(note in w for w in result["warnings"]), note
        assert note in text, note
    recall = text.split("## R@100")[1]
    assert "R@100 counts up to 100 ranks, but ZeroGR decoded at most K=10 DocIDs per query." in recall


def test_dropping_no_relevant_queries_and_a_broken_trie_on_rerun(run, caplog):
    settings = dict(run["settings"], OUT_DIR=os.path.join(run["tmp"], "out-drop"), STAGE="eval", DROP_NO_POSITIVE=True)
    saved = dict(genir.C)
    genir.C.update(settings)
    trie = os.path.join(genir.model_dir(run["task"]), "trie")
    with open(os.path.join(trie, "leaf_doc_ptr.npy"), "w"):
        pass  # emptied
    try:
        with caplog.at_level(logging.WARNING, "genir"):
            assert genir.main([]) == 0
    finally:
        genir.C.clear()
        genir.C.update(saved)
    assert any(os.path.join(trie, "leaf_doc_ptr.npy") in r.getMessage() for r in caplog.records)
    assert PrefixTree.load(trie).n_leaves == 1
    result = read_json(os.path.join(settings["OUT_DIR"], "t", run["task"], "metrics.json"))
    assert result["queries"] == 8 and result["decoded_queries"] == 8
    assert result["qrels_report"]["no_relevant_dropped"] == 1
    text = open(os.path.join(settings["OUT_DIR"], "t", "results.md"), encoding="utf-8").read()
    assert "1 queries have no relevant label (every label scores 0): left out of the qrels" in text
    assert "zero" not in metrics.read_trec_run(os.path.join(settings["OUT_DIR"], "t", run["task"], "zerogr.run"))
