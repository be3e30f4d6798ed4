"""metrics.py: hand-computed metrics, run files, the BM25 baseline, tables, ablation statistics, plots."""
import logging
import os

import ir_measures
import numpy as np
import pytest

import bm25
import mair_config
import metrics
from data import qrels_from_queries
from file_io import DataError, read_jsonl

LOG3 = np.log2(3)  # discount of rank 2


def _row(table, first_cell):
    """Cells of the Markdown row whose first cell is `first_cell`."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells[1:]
    raise AssertionError(f"no row '{first_cell}' in\n{table}")


# ----------------------------------------------------------------------------- metrics

def test_metrics_match_hand_computation_graded_and_missing_query():
    qrels = {"q1": {"d1": 2, "d2": 1, "d3": 0}, "q2": {"d4": 1}, "q3": {"d5": 1, "d6": 1}}
    run = metrics.run_from_rankings({"q1": ["d2", "d1", "d3", "d7"], "q2": ["d9", "d4"]})  # q3 missing
    agg, per_query = metrics.evaluate(qrels, run)

    # q1: top doc relevant (grade 1 of max 2): P@1 = 1 but nDCG@1 = 1/2.
    ndcg10_q1 = (1 + 2 / LOG3) / (2 + 1 / LOG3)
    assert per_query["Acc@1"] == {"q1": 1.0, "q2": 0.0, "q3": 0.0}
    assert per_query["nDCG@1"]["q1"] == pytest.approx(0.5)
    assert per_query["nDCG@10"]["q1"] == pytest.approx(ndcg10_q1)
    assert per_query["nDCG@10"]["q2"] == pytest.approx(1 / LOG3)
    assert per_query["MAP"]["q2"] == pytest.approx(0.5)
    assert set(per_query["R@100"]) == {"q1", "q2", "q3"}  # the missing query is present, as 0

    assert agg["Acc@1"] == pytest.approx(1 / 3)
    assert agg["nDCG@1"] == pytest.approx(0.5 / 3)
    assert agg["nDCG@10"] == pytest.approx((ndcg10_q1 + 1 / LOG3) / 3)
    assert agg["R@100"] == pytest.approx(2 / 3)
    assert agg["MAP"] == pytest.approx((1 + 0.5) / 3)
    assert list(metrics.MEASURES) == ["Acc@1", "nDCG@1", "nDCG@10", "R@100", "MAP"]


def test_recall_cutoff_at_100_and_no_relevant_query_scores_zero():
    ranking = ["rel1"] + [f"n{i}" for i in range(99)] + ["rel2"]  # rel2 at rank 101
    qrels = {"q": {"rel1": 1, "rel2": 1}, "none": {"x": 0}}
    agg, per_query = metrics.evaluate(qrels, metrics.run_from_rankings({"q": ranking, "none": ["x"]}))
    assert per_query["R@100"] == {"q": 0.5, "none": 0.0}
    assert per_query["MAP"]["q"] == pytest.approx((1 + 2 / 101) / 2)
    assert agg["R@100"] == pytest.approx(0.25)


def test_run_scores_strictly_decrease_and_make_ties_irrelevant():
    run = metrics.run_from_rankings({"q": ["x", "y", "x", "z"]})
    assert run == {"q": {"x": 1.0, "y": 0.5, "z": pytest.approx(1 / 3)}}
    # With tied scores trec_eval orders by doc id descending, so "b" would come first.
    qrels = {"q": {"a": 1}}
    assert metrics.evaluate(qrels, metrics.run_from_rankings({"q": ["a", "b"]}))[0]["Acc@1"] == 1.0
    assert metrics.evaluate(qrels, {"q": {"a": 1.0, "b": 1.0}})[0]["Acc@1"] == 0.0


def test_evaluate_agrees_with_ir_measures_and_ignores_unjudged_queries():
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 1}}
    run = metrics.run_from_rankings({"q1": ["b", "x", "a"], "q2": [], "extra": ["c"]})
    agg, _ = metrics.evaluate(qrels, run)
    expected = ir_measures.calc_aggregate(list(metrics.MEASURES.values()), qrels,
                                          {"q1": run["q1"]})
    for name, measure in metrics.MEASURES.items():
        assert agg[name] == pytest.approx(expected[measure])
    with pytest.raises(ValueError, match="empty qrels"):
        metrics.evaluate({}, run)


def test_qrels_report_unknown_labels_empty_queries(caplog):
    def row(qid, query, *labels):
        return {"qid": qid, "instruction": "i", "query": query,
                "labels": [{"id": d, "score": s} for d, s in labels]}

    queries = [row("q1", "find", ("d1", 1), ("dX", 1)), row("q2", "more", ("dY", 2), ("dZ", 0)),
               row("q3", " ", ("d1", 0))]
    with caplog.at_level(logging.WARNING, logger="metrics"):
        qrels, report = qrels_from_queries(queries, doc_ids=["d1", "d2"], source="TaskA")
    assert qrels == {"q1": {"d1": 1, "dX": 1}, "q2": {"dY": 2, "dZ": 0}, "q3": {"d1": 0}}  # unknown labels kept
    assert report["queries"] == 3 and report["labels"] == 5
    assert report["unknown_labels"] == 3
    assert report["all_labels_unknown"] == 1
    assert report["empty_query"] == 1
    assert report["no_relevant"] == 1
    assert report["unknown_examples"] == ["q1 -> dX", "q2 -> dY", "q2 -> dZ"]
    assert "TaskA: 3 of 5 labels name documents missing" in caplog.text
    # Unknown labels count against recall: q1 finds d1 but never dX.
    assert metrics.evaluate(qrels, metrics.run_from_rankings({"q1": ["d1", "d2"]}))[1]["R@100"]["q1"] == 0.5


def test_qrels_without_corpus_and_bad_rows():
    qrels, report = qrels_from_queries([{"qid": 7, "query": "x", "labels": [{"id": 3, "score": 1.0}]}])
    assert qrels == {"7": {"3": 1}} and report["unknown_labels"] == 0
    with pytest.raises(DataError, match="duplicate qid 'a'"):
        qrels_from_queries([{"qid": "a", "labels": []}] * 2, source="S")
    with pytest.raises(DataError, match="S: query row 0"):
        qrels_from_queries([{"qid": "a"}], source="S")


def test_trec_run_round_trip(tmp_path):
    run = metrics.run_from_rankings({"q1": ["d3", "d1", "d2"], "q2": ["d9"]})
    run["q1"] = dict(reversed(list(run["q1"].items())))  # insertion order must not matter
    path = tmp_path / "runs" / "bm25.trec"
    metrics.write_trec_run(run, str(path), tag="bm25")
    lines = path.read_text().splitlines()
    assert lines[0] == "q1 Q0 d3 1 1.0 bm25"
    assert [line.split()[2:4] for line in lines[:3]] == [["d3", "1"], ["d1", "2"], ["d2", "3"]]
    assert all(len(line.split()) == 6 for line in lines)
    assert metrics.read_trec_run(str(path)) == run  # scores round-trip exactly
    assert os.listdir(path.parent) == ["bm25.trec"]
    with pytest.raises(ValueError, match="whitespace"):
        metrics.write_trec_run({"q": {"doc a": 1.0}}, str(tmp_path / "bad.trec"), tag="t")
    (tmp_path / "broken.trec").write_text("q1 Q0 d1 1 0.5 t\nq1 d2 2\n")
    with pytest.raises(DataError, match=r"broken\.trec:2"):
        metrics.read_trec_run(str(tmp_path / "broken.trec"))


# ----------------------------------------------------------------------------- BM25

TOY_DOCS = [
    {"id": "fruit", "doc": "apple banana apple"},
    {"id": "stone", "doc": "cherry stones and dates"},
    {"id": "run", "doc": "she runs daily"},
    {"id": "stop", "doc": "the the and of"},
]


def test_bm25_toy_ranking_stopwords_stemming_and_instruction():
    index = bm25.BM25Index(TOY_DOCS, "english", True)
    queries = [{"qid": "a", "instruction": "about cherry", "query": "the apple"},
               {"qid": "b", "instruction": "", "query": "running"}]
    # "the" is a stopword: the stopword-only document shares no term and is not retrieved.
    assert bm25.bm25_search(index, queries) == {"a": ["fruit"], "b": ["run"]}
    with_inst = bm25.bm25_search(index, queries, with_instruction=True)
    assert set(with_inst["a"]) == {"fruit", "stone"}
    assert bm25.bm25_search(bm25.BM25Index(TOY_DOCS, None, True), queries)["b"] == []  # "running" != "runs"
    assert bm25.bm25_search(index, queries, k=1) == {"a": ["fruit"], "b": ["run"]}


def test_bm25_ties_broken_by_corpus_order_and_k_cut():
    docs = {f"d{i}": "same words here" for i in range(5)}
    assert bm25.BM25Index(docs, "english", True).search(["words"], k=3) == [["d0", "d1", "d2"]]


def test_bm25_on_demo_corpus(demo_root):
    task = "PyDoc-Net"
    docs, queries = read_jsonl(mair_config.docs_path(task)), read_jsonl(mair_config.queries_path(task))
    qrels, report = qrels_from_queries(queries, [d["id"] for d in docs], task)
    assert report["unknown_labels"] == 0
    index = bm25.BM25Index(docs, "english", True)
    rankings = bm25.bm25_search(index, queries, k=100)
    assert set(rankings) == set(qrels) and max(map(len, rankings.values())) <= 100
    agg, _ = metrics.evaluate(qrels, metrics.run_from_rankings(rankings))
    assert agg["Acc@1"] > 0.15, agg            # chance is about 1/600
    assert agg["R@100"] > agg["nDCG@10"] > agg["Acc@1"]
    # The batched scores are bm25s's own: the top document has the highest bm25s score.
    tokens = index._tokenize([q["query"] for q in queries[:50]], return_ids=False)
    position = {doc_id: i for i, doc_id in enumerate(index.doc_ids)}
    for q, toks in zip(queries[:50], tokens):
        if rankings[q["qid"]]:
            scores = index.bm25.get_scores(toks)
            ranked = scores[[position[d] for d in rankings[q["qid"]]]]
            assert ranked[0] == pytest.approx(scores.max())
            assert np.all(np.diff(ranked) <= 1e-6)


# ----------------------------------------------------------------------------- tables

def _toy_results():
    return {
        "T1": {"m1": {"Acc@1": 0.2}, "m2": {"Acc@1": 0.4}, "m3": {"Acc@1": 0.1}},
        "B1": {"m1": {"Acc@1": 0.5, "nDCG@10": 0.7}, "m2": {"Acc@1": 0.1, "nDCG@10": 0.3}},
        "T3": {"m1": {"Acc@1": 0.9}, "m2": {"Acc@1": 0.3}},
        "T2": {"m1": {"Acc@1": 0.4}, "m2": {"Acc@1": 0.6}},
    }


def test_results_table_domain_mair_and_beir_averages():
    task_domain = {"T1": "Code", "T2": "Code", "T3": "Legal"}
    table = metrics.results_table(_toy_results(), task_domain, "p@1", "domains", beir_tasks=("B1", "Other"))
    assert _row(table, "Method") == ["T1", "T2", "T3", "B1", "Code avg", "Legal avg",
                                     "MAIR avg (Acc@1)", "BEIR avg (nDCG@10)"]
    # m1: Code (20+40)/2 = 30, Legal 90, MAIR = mean of domain averages (30+90)/2 = 60 (not the
    # task mean 50), BEIR = nDCG@10 of B1.
    assert _row(table, "m1") == ["20.0", "40.0", "90.0", "50.0", "30.0", "90.0", "60.0", "70.0"]
    assert _row(table, "m2") == ["40.0", "60.0", "30.0", "10.0", "50.0", "30.0", "40.0", "30.0"]
    assert _row(table, "m3") == ["10.0", "–", "–", "–", "–", "–", "–", "–"]
    assert "mean of the per-domain averages" in table


def test_results_table_without_beir_and_method_order():
    results = {t: r for t, r in _toy_results().items() if t != "B1"}
    table = metrics.results_table(results, {"T1": "Code", "T2": "Code", "T3": "Legal"}, "p@1", "domains",
                                  metric="Acc@1", methods=["m2", "m1"])
    assert "BEIR" not in _row(table, "Method")[-1]
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:4]] == ["m2", "m1"]
    with pytest.raises(KeyError, match="no domain"):
        metrics.results_table(results, {"T1": "Code"}, "p@1", "domains")


def test_results_tables_one_per_metric_in_order():
    results = {"T1": {"bm25": {"Acc@1": 0.25, "nDCG@10": 0.5, "R@100": 0.75}}}
    md = metrics.results_tables(results, {"T1": "Code"}, "p@1", "domains")
    assert md.index("## Acc@1") < md.index("## nDCG@10") < md.index("## R@100")
    assert [_row(part, "bm25")[0] for part in md.split("## ")[1:]] == ["25.0", "50.0", "75.0"]


# ----------------------------------------------------------------------------- ablation statistics

def test_bootstrap_ci_brackets_mean_and_narrows_with_data():
    rng = np.random.default_rng(0)
    small, large = rng.random(50), rng.random(2000)
    mean_s, lo_s, hi_s = metrics.bootstrap_ci(small)
    mean_l, lo_l, hi_l = metrics.bootstrap_ci(large)
    assert lo_s < mean_s < hi_s and lo_l < mean_l < hi_l
    assert mean_s == pytest.approx(small.mean())
    assert hi_l - lo_l < (hi_s - lo_s) / 3            # width shrinks like 1/sqrt(n)
    assert metrics.bootstrap_ci([0.4] * 10) == pytest.approx((0.4, 0.4, 0.4))
    assert metrics.bootstrap_ci(small) == metrics.bootstrap_ci(small)  # seeded


def test_paired_test_exact_small_case_and_extremes():
    # 5 equal positive differences: only the all-plus and all-minus of 2^5 sign flips reach
    # the observed |mean|, so the exact two-sided p is 2/32.
    assert metrics.paired_test([1] * 5, [0] * 5) == pytest.approx(2 / 32, abs=0.01)
    rng = np.random.default_rng(1)
    b = rng.random(200)
    assert metrics.paired_test(b + 0.1 + rng.normal(0, 0.05, 200), b) < 0.001
    assert metrics.paired_test(b, b) == 1.0
    a = {f"q{i}": v for i, v in enumerate(rng.random(30))}
    c = {q: v + 0.01 for q, v in reversed(list(a.items()))}
    assert metrics.paired_test(a, c) == metrics.paired_test(c, a)
    with pytest.raises(ValueError, match="different queries"):
        metrics.paired_test({"q1": 1}, {"q2": 1})


def test_holm_adjustment_by_hand():
    assert metrics.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def _per_query(values_by_metric):
    return {k: {f"T/q{i}": float(v) for i, v in enumerate(vals)} for k, vals in values_by_metric.items()}


def _noise_methods(n=300):
    rng = np.random.default_rng(7)
    return {m: _per_query({k: rng.random(n) < 0.5 for k in metrics.TABLE_METRICS})
            for m in ("greedy", "reverse_annealed", "nucleus")}


def test_ablation_table_says_noise_is_noise():
    table = metrics.ablation_table(_noise_methods())
    assert table.splitlines()[2].startswith("| reverse_annealed (ref) |")
    assert ("No method differs significantly from reverse_annealed at alpha=0.05 (Holm) on 300 "
            "queries: the differences are within noise.") in table
    assert "*" not in table.split("\n\n")[0]


def test_ablation_table_marks_a_true_difference():
    rng = np.random.default_rng(3)
    n = 300
    base = {"Acc@1": rng.random(n) < 0.45, "nDCG@10": rng.random(n), "R@100": rng.random(n) < 0.82}
    greedy = dict(base, **{"R@100": base["R@100"] & (rng.random(n) < 0.6)})  # loses recall only
    table = metrics.ablation_table({"reverse_annealed": _per_query(base), "greedy": _per_query(greedy)})
    cells = _row(table, "greedy")
    assert cells[3] == "+0.0 (p=1.000)"                       # Δ Acc@1: identical
    assert cells[5].endswith("*") and cells[5].startswith("-")  # Δ R@100: significant drop
    assert ("Significant differences from reverse_annealed at alpha=0.05 (Holm) on 300 queries: "
            "greedy on R@100") in table
    mean, low, high = (float(x) for x in cells[0].replace("[", "").replace("]", "").replace(",", "").split())
    assert low < mean < high and mean == pytest.approx(100 * base["Acc@1"].mean(), abs=0.05)
    with pytest.raises(KeyError, match="reference"):
        metrics.ablation_table({"greedy": _per_query(greedy)})


# ----------------------------------------------------------------------------- plots

def test_plots_write_png_atomically(tmp_path):
    metrics.plot_ablation(_noise_methods(50), str(tmp_path / "ablation.png"))
    temps = [1.5 * i / 99 for i in range(100)]
    metrics.plot_schedule(temps, str(tmp_path / "schedule.png"))
    for name in ("ablation.png", "schedule.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(os.listdir(tmp_path)) == ["ablation.png", "schedule.png"]  # no temp files left
