"""Training-data switches (the released behaviour by default): NUM_PSEUDO, the pseudo-queries per
document trained on; DOCASQ_MODE, how the document-as-query passages are cut; DOCASQ_REDRAW, passages
drawn again each epoch; QUERY_FILTER, pseudo-queries BM25 ties back to their document. Run through
train_data.prepare (and the encoded examples) on a small synthetic corpus."""
import dataclasses
import os

import numpy as np
import pytest

import lm
import mair_config as mc
import rank_groups
import train_data
from data import docasq_rows
from file_io import DataError, read_jsonl, write_jsonl

TASK = "Tiny"
N_DOCS, NUM_Q, WORDS = 8, 4, 5
NO_DOCID = 7  # the document left without a DocID: its examples are skipped
INSTRUCTION = "Find the document."


def query_text(doc, k):
    return f"query {k} about doc {doc}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus under a data root, its NUM_Q pseudo-queries per document (documents 0-3 each in one
    run, documents 4-7 in two passes of two queries, as a file need not group them) and its DocIDs."""
    tmp = str(tmp_path_factory.mktemp("switches_data"))
    root = os.path.join(tmp, "data")
    docs = [{"id": f"d{i}", "doc": " ".join(f"w{i}x{j}" for j in range(3 + 4 * i))} for i in range(N_DOCS)]
    write_jsonl(docs, mc.docs_path(TASK, root))
    write_jsonl([{"qid": "q", "instruction": INSTRUCTION, "query": "q", "labels": [{"id": "d0", "score": 1}]}],
                mc.queries_path(TASK, root))
    write_jsonl([{"id": d["id"], "gist": f"title {d['id']}"} for d in docs[:NO_DOCID]], mc.gist_path(TASK, root=root))
    order = [(i, k) for i in range(4) for k in range(NUM_Q)]
    order += [(i, k) for half in (0, 2) for i in range(4, N_DOCS) for k in (half, half + 1)]
    write_jsonl([{"instruction": INSTRUCTION, "query": query_text(i, k), "labels": [{"id": f"d{i}", "score": 1}]}
                 for i, k in order], mc.pseudo_queries_path(TASK, "QG", NUM_Q, root))
    base = train_data.TrainDataSettings(
        data_root=root, qg_sufix="QG", num_q=NUM_Q, num_pseudo=None, gist_type="title", docasq_n=2,
        docasq_mode="random", docasq_words=WORDS, docasq_redraw=False, query_filter=None, seed=0, dist_timeout=60,
        max_len=128, max_instruction_tokens=32, instruction_in_prompt=True, max_query_tokens=32, rank_loss=False,
        negative_depth=10, bm25_stemmer=None, bm25_positive_only=False, batch_size=4, group_size=2, rank_every=1,
        ranknet_mode="joint")
    return {"tmp": tmp, "root": root, "docs": docs, "base": base}


def build(corpus, folder, **switches):
    settings = dataclasses.replace(corpus["base"], **switches)
    docs = train_data.CorpusFile(mc.docs_path(TASK, corpus["root"]))
    return train_data.prepare(TASK, docs, os.path.join(corpus["tmp"], folder), settings), settings


def examples(data, path):
    """{doc id: [query texts]} of the set's examples read from the file `path`."""
    at = data.meta["files"].index(path)
    start, found = sum(data.meta["counts"][:at]), {}
    for i in range(start, start + data.meta["counts"][at]):
        found.setdefault(data.docs.ids[int(data.doc[i])], []).append(data.row(i)["query"])
    return found


def pseudo_queries(corpus):
    return mc.pseudo_queries_path(TASK, "QG", NUM_Q, corpus["root"])


def first_examples(data):
    """Each ranking group's (document, query text)."""
    return [(data.docs.ids[int(data.doc[g])], data.row(int(g))["query"]) for g in data.groups]


@pytest.mark.parametrize("b", [None, 2, 3, 1])
def test_num_pseudo_keeps_each_documents_first_queries(corpus, b):
    data, _ = build(corpus, f"b{b}", num_pseudo=b)
    kept = NUM_Q if b is None else b
    assert examples(data, pseudo_queries(corpus)) == {f"d{i}": [query_text(i, k) for k in range(kept)]
                                                      for i in range(NO_DOCID)}
    assert data.meta["counts"][0] == NO_DOCID * kept
    assert data.meta["files"][1] == mc.docasq_path(TASK, 2, corpus["root"])
    assert first_examples(data) == [(f"d{i}", query_text(i, 0)) for i in range(NO_DOCID)]


def test_num_pseudo_zero_trains_on_docasq_passages_without_a_pseudo_query_file(corpus, tiny_model_path):
    with pytest.raises(DataError, match="no pseudo-queries at .*Absent-4"):
        build(corpus, "absent", qg_sufix="Absent")
    data, settings = build(corpus, "b0", qg_sufix="Absent", num_pseudo=0, rank_loss=True)
    assert data.meta["files"] == [mc.docasq_path(TASK, 2, corpus["root"])]
    passages = examples(data, data.meta["files"][0])
    assert sorted(passages) == [f"d{i}" for i in range(NO_DOCID)]
    assert first_examples(data) == [(doc, passages[doc][0]) for doc in sorted(passages)]
    tok = lm.load_tokenizer(tiny_model_path)
    batch = rank_groups.RankGroups(tok, data.bm25, data.docs, data, tok.eos_token_id, settings)(0)
    assert batch["input_ids"].shape[0] == settings.batch_size and batch["group_size"] == settings.group_size


def test_leading_mode_cuts_one_passage_the_first_words(corpus):
    data, _ = build(corpus, "leading", docasq_mode="leading", docasq_n=3)
    path = mc.docasq_path(TASK, 3, corpus["root"], "leading")
    assert data.meta["files"][1] == path and os.path.basename(os.path.dirname(os.path.dirname(path))) == "DocAsQ-lead"
    assert examples(data, path) == {d["id"]: [" ".join(d["doc"].split()[:WORDS])] for d in corpus["docs"][:NO_DOCID]}
    assert len(read_jsonl(path)) == N_DOCS and len(examples(data, pseudo_queries(corpus))["d0"]) == NUM_Q


def test_random_mode_is_the_released_windows_at_the_former_path(corpus):
    data, _ = build(corpus, "random")
    path = mc.docasq_path(TASK, 2, corpus["root"])
    assert path == os.path.join(corpus["root"], "MAIR-Data", "DocAsQ-2", TASK, "queries.jsonl")
    assert data.meta["files"][1] == path
    assert read_jsonl(path) == list(docasq_rows(corpus["docs"], INSTRUCTION, 2, WORDS, 0, "random"))
    assert max(len(v) for v in examples(data, path).values()) == 2


def test_none_mode_makes_no_passage(corpus):
    data, settings = build(corpus, "none", docasq_mode="none")
    assert train_data.source_paths(TASK, settings)["docasq"] is None
    assert data.meta["files"] == [pseudo_queries(corpus)]
    assert len(data) == NO_DOCID * NUM_Q
    with pytest.raises(ValueError, match="DOCASQ_MODE='none'"):
        mc.docasq_path(TASK, 2, corpus["root"], "none")


def test_a_switch_change_rebuilds_the_set(corpus):
    sizes = [len(build(corpus, "same", **switches)[0]) for switches in
             ({}, {"num_pseudo": 1}, {"docasq_mode": "leading"}, {"docasq_mode": "none"})]
    assert sizes[1:] == [sizes[0] - NO_DOCID * (NUM_Q - 1), NO_DOCID * (NUM_Q + 1), NO_DOCID * NUM_Q]


@pytest.mark.parametrize("switches, message", [
    ({"num_pseudo": -1}, r"NUM_PSEUDO=-1: must be None .* from 0 to NUM_Q=4"),
    ({"num_pseudo": 5}, r"NUM_PSEUDO=5: must be None"),
    ({"num_pseudo": "2"}, r"NUM_PSEUDO='2': must be None"),
    ({"num_pseudo": 2.0}, r"NUM_PSEUDO=2\.0: must be None"),
    ({"num_pseudo": True}, r"NUM_PSEUDO=True: must be None"),
    ({"num_pseudo": 0, "docasq_mode": "none"}, r"NUM_PSEUDO=0 with DOCASQ_MODE='none': training would have no"),
    ({"num_pseudo": 0, "docasq_n": 0}, r"NUM_PSEUDO=0 with DOCASQ_N=0: training would have no examples"),
    ({"docasq_mode": "first"}, r"DOCASQ_MODE='first' is not one of 'random', 'leading', 'none'"),
    ({"docasq_redraw": True, "docasq_mode": "leading"}, r"DOCASQ_REDRAW=True .* needs DOCASQ_MODE='random'"),
    ({"docasq_redraw": True, "docasq_n": 0}, r"DOCASQ_REDRAW=True .* and DOCASQ_N > 0"),
    ({"query_filter": 0}, r"QUERY_FILTER=0: must be None \(no filter\) or a positive int"),
    ({"query_filter": True}, r"QUERY_FILTER=True: must be None"),
])
def test_bad_switches_are_refused_by_name(corpus, switches, message):
    with pytest.raises(SystemExit, match=message):
        train_data.check_settings(dataclasses.replace(corpus["base"], **switches))
    with pytest.raises(SystemExit, match=message):
        build(corpus, "refused", **switches)
    assert not os.path.exists(os.path.join(corpus["tmp"], "refused"))


def test_a_made_docasq_file_follows_its_settings_and_ones_own_is_kept(corpus):
    data, _ = build(corpus, "words5", docasq_n=3)
    path = mc.docasq_path(TASK, 3, corpus["root"])
    assert max(len(q.split()) for qs in examples(data, path).values() for q in qs) == WORDS
    data, _ = build(corpus, "words2", docasq_n=3, docasq_words=2)  # same path, other words: made again
    assert {len(q.split()) for qs in examples(data, path).values() for q in qs} == {2}
    os.remove(os.path.splitext(path)[0] + ".settings.json")
    write_jsonl([{"instruction": "", "query": "my own passage", "labels": [{"id": "d1", "score": 1}]}], path)
    data, _ = build(corpus, "own", docasq_n=3)
    assert examples(data, path) == {"d1": ["my own passage"]}
    os.remove(path)


# ---------------------------------------------------------------------------------------------- DOCASQ_REDRAW

def queries_seen(data, settings, tok, epoch, monkeypatch):
    """The query text of every example as EncodedExamples hands it to encode at `epoch`."""
    monkeypatch.setattr(train_data, "encode", lambda tokenizer, row, docid, s: row["query"])
    encoded = train_data.EncodedExamples(data, tok, settings)
    encoded.set_epoch(epoch)
    return [encoded[i] for i in range(len(encoded))]


def test_redraw_cuts_new_windows_of_the_document_each_epoch(corpus, tiny_model_path, monkeypatch):
    tok = lm.load_tokenizer(tiny_model_path)
    fixed, fixed_settings = build(corpus, "fixed")
    data, settings = build(corpus, "redraw", docasq_redraw=True)
    stored = [data.row(i)["query"] for i in range(len(data))]
    assert [fixed.row(i)["query"] for i in range(len(fixed))] == stored  # the same set, the same first epoch
    n_pseudo = data.meta["counts"][0]
    assert queries_seen(fixed, fixed_settings, tok, 3, monkeypatch) == stored  # off: every epoch the stored set
    assert queries_seen(data, settings, tok, 0, monkeypatch) == stored
    epochs = [queries_seen(data, settings, tok, e, monkeypatch) for e in (1, 2)]
    assert queries_seen(data, settings, tok, 1, monkeypatch) == epochs[0]  # seeded: any process draws the same
    docs = {d["id"]: d["doc"].split() for d in corpus["docs"]}
    for seen in epochs:
        assert seen[:n_pseudo] == stored[:n_pseudo]  # pseudo-queries are never redrawn
        for i in range(n_pseudo, len(data)):
            words = docs[data.docs.ids[int(data.doc[i])]]
            assert any(seen[i] == " ".join(words[s:s + WORDS]) for s in range(max(1, len(words) - WORDS + 1)))
    changed = [sum(a != b for a, b in zip(seen[n_pseudo:], stored[n_pseudo:])) for seen in epochs]
    assert min(changed) >= (len(data) - n_pseudo) // 2 and epochs[0] != epochs[1]


def test_redrawn_ranking_groups_keep_the_stored_passages_bm25_negatives(corpus, tiny_model_path):
    """A group's query is a new window at each draw, but its BM25 candidates are searched with the stored
    passage: the same whenever the group is first drawn, so a resumed run (candidates not yet known in
    memory) draws the negatives an uninterrupted one does."""
    task, root = "TinyShared", corpus["root"]
    docs = [{"id": f"s{i}", "doc": " ".join(f"v{(i + k) % 12}" for k in range(9))} for i in range(N_DOCS)]
    write_jsonl(docs, mc.docs_path(task, root))
    write_jsonl([{"qid": "q", "instruction": INSTRUCTION, "query": "q", "labels": [{"id": "s0", "score": 1}]}],
                mc.queries_path(task, root))
    write_jsonl([{"id": d["id"], "gist": f"title {d['id']}"} for d in docs], mc.gist_path(task, root=root))
    settings = dataclasses.replace(corpus["base"], num_pseudo=0, docasq_n=1, docasq_words=3, docasq_redraw=True,
                                   rank_loss=True, bm25_positive_only=True, negative_depth=4, ranknet_mode="joint")
    data = train_data.prepare(task, train_data.CorpusFile(mc.docs_path(task, root)),
                              os.path.join(corpus["tmp"], "redraw-rank"), settings)
    tok = lm.load_tokenizer(tiny_model_path)
    first, later = (rank_groups.RankGroups(tok, data.bm25, data.docs, data, tok.eos_token_id, settings)
                    for _ in range(2))
    for step in range(4):
        first(step)
    later(9)
    for groups in (first, later):
        assert groups.known.any()
        for g in np.flatnonzero(groups.known):
            stored = data.row(int(data.groups[g]))["query"]
            found = data.bm25.search_indices([stored], settings.negative_depth)[0]
            assert groups.candidates(g, "unused").tolist() == found.tolist()


# ---------------------------------------------------------------------------------------------- QUERY_FILTER

def tie_back_queries(corpus, sufix):
    """Per document, in file order: k=1 no corpus word, k=0 two of its own words (BM25's first), k=3 one of its
    words and two of the next document's (BM25's second), k=2 a word of the next document only."""
    texts = {0: lambda i: f"w{i}x0 w{i}x1", 1: lambda i: "nothing matches", 2: lambda i: f"w{i + 1}x0",
             3: lambda i: f"w{i}x0 w{i + 1}x0 w{i + 1}x1"}
    write_jsonl([{"instruction": INSTRUCTION, "query": texts[k](i), "labels": [{"id": f"d{i}", "score": 1}]}
                 for i in range(N_DOCS - 1) for k in (1, 0, 3, 2)],
                mc.pseudo_queries_path(TASK, sufix, NUM_Q, corpus["root"]))
    return texts


@pytest.mark.parametrize("depth, num_pseudo, kept", [(None, None, (1, 0, 3, 2)), (1, None, (0,)), (2, None, (0, 3)),
                                                      (2, 2, (0,)), (5, 3, (0, 3)), (1, 1, ())])
def test_the_filter_keeps_the_queries_that_bm25_ties_back_to_their_document(corpus, depth, num_pseudo, kept):
    texts = tie_back_queries(corpus, "Tie")
    data, _ = build(corpus, f"filter{depth}-{num_pseudo}", qg_sufix="Tie", query_filter=depth, num_pseudo=num_pseudo)
    path = mc.pseudo_queries_path(TASK, "Tie", NUM_Q, corpus["root"])
    assert examples(data, path) == ({f"d{i}": [texts[k](i) for k in kept] for i in range(NO_DOCID)} if kept else {})
    assert data.meta["filtered"] == (NO_DOCID * (min(num_pseudo or NUM_Q, NUM_Q) - len(kept)) if depth else 0)
    passages = examples(data, data.meta["files"][1])  # a document with no query left: its group is its passage's
    assert first_examples(data) == [(f"d{i}", texts[kept[0]](i) if kept else passages[f"d{i}"][0])
                                    for i in range(NO_DOCID)]
