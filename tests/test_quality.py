"""Generator-quality figures (quality.py) on hand-made corpora whose answers are known."""
import pytest

import quality

DOCS = [{"id": "a", "doc": "socket close shuts the network connection"},
        {"id": "b", "doc": "json dumps writes an object as text"},
        {"id": "c", "doc": "random shuffle reorders a list in place"}]


def test_self_retrieval_counts_the_queries_that_find_their_own_document():
    queries = {"a": ["close a network socket", "writes an object as text"],   # 1 of 2 finds "a"
               "b": ["json dumps", "json dumps"],                            # both find "b"
               "c": ["zebra"]}                                               # no shared term: a miss
    q = quality.query_quality(DOCS, queries)
    assert q["self_retrieval"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert q["duplicate_share"] == pytest.approx(1 - 4 / 5)
    assert q["mean_words"] == pytest.approx((4 + 5 + 2 + 2 + 1) / 5)
    assert q["queries"] == 5 and "self_retrieval" in q["definitions"]


def test_self_retrieval_does_not_stem():
    # "closing" matches "close" only with a stemmer; without one the query shares no term with "a"
    q = quality.query_quality(DOCS, {"a": ["closing"]})
    assert q["self_retrieval"] == 0.0


def test_docid_figures_on_raw_and_final_text():
    raw = {"a": "socket close", "b": "Socket  Close", "c": "shuffle banana"}
    final = {"a": "socket close network", "b": "json dumps text", "c": "random shuffle list"}
    r = quality.docid_report(DOCS, raw, final)
    assert r["raw"]["collision_rate"] == pytest.approx(2 / 3)       # a and b share one DocID
    assert r["raw"]["in_document_share"] == pytest.approx(3 / 6)    # b's two words and "banana" are not in their docs
    assert r["raw"]["mean_words"] == pytest.approx(2.0)
    assert r["final"] == {"documents": 3, "collision_rate": 0.0, "mean_words": 3.0, "in_document_share": 1.0}
