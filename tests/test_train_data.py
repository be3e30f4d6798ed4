"""train_data.py: the on-disk training set gives exactly the batches of the former in-memory lists;
the BM25 index, the DocID table and the lazily drawn ranking groups."""
import os
import random

import bm25s
import pytest
import scipy.sparse as sp
import Stemmer
import torch

import bm25
import genir
import lm
import mair_config as mc
import rank_groups
import sft
import train_data
from data import load_docids
from file_io import DataError, read_jsonl, read_rows, write_jsonl
from small_corpus import write_small_corpus

TASK = "PyDoc-Net"
N_DOCS = 150
NO_DOCID = 4   # documents whose DocID is left out (their queries are skipped)


def _make_corpus(root, demo_root):
    """The task's first N_DOCS documents, their real queries as pseudo-queries, teacher DocIDs with a
    few documents left out, one blank and one for an unknown document; no DocAsQ file (built)."""
    docs = read_jsonl(mc.docs_path(TASK, demo_root))[:N_DOCS]
    teacher = write_small_corpus(root, demo_root, TASK, docs)
    gists = [{"id": d["id"], "gist": teacher.docid(d["doc"])} for d in docs[NO_DOCID:]]
    gists += [{"id": docs[NO_DOCID]["id"], "gist": "  "}, {"id": "ghost", "gist": "no such document"}]
    write_jsonl(gists, mc.gist_path(TASK, root=root))
    return docs


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_root, tiny_model_path):
    """The corpus, genir's settings for it (restored afterwards) and the tiny model's tokenizer."""
    tmp = str(tmp_path_factory.mktemp("train_data"))
    root = os.path.join(tmp, "data")
    docs = _make_corpus(root, demo_root)
    saved = dict(genir.C)
    genir.C.update(DATA_ROOT=root, MODEL_DIR=os.path.join(tmp, "models"), RUN="t", NUM_Q=2, NUM_PSEUDO=None,
                   DOCASQ_N=2, DOCASQ_MODE="random", DOCASQ_REDRAW=False, QUERY_FILTER=None, DOCASQ_WORDS=24,
                   BATCH_SIZE=16, MAX_LEN=128, RANK_EVERY=4, GROUP_SIZE=4, SEED=3,
                   BM25_STEMMER="english", BM25_POSITIVE_ONLY=True, RANKNET_MODE="joint")
    tokenizer = lm.load_tokenizer(tiny_model_path)
    token_id = genir.rank_token_id(tokenizer)
    data = genir.training_queries(TASK, train_data.CorpusFile(mc.docs_path(TASK, root)))
    examples, supplier = genir.training_data(data, tokenizer, token_id)
    yield {"root": root, "docs": docs, "tokenizer": tokenizer, "token_id": token_id, "examples": examples,
           "supplier": supplier}
    genir.C.clear()
    genir.C.update(saved)


def reference_docasq(docs, instruction):
    """The DocAsQ rows as genir built them before train_data (copied)."""
    rng = random.Random(genir.C["SEED"])
    rows = []
    for d in docs:
        words = d["doc"].split()
        if not words:
            continue
        span = genir.C["DOCASQ_WORDS"]
        starts = sorted({rng.randrange(max(1, len(words) - span + 1)) for _ in range(genir.C["DOCASQ_N"])})
        for s in starts:
            rows.append({"instruction": instruction, "query": " ".join(words[s:s + span]),
                         "labels": [{"id": d["id"], "score": 1}]})
    return rows


def reference_examples(tokenizer, docs, root):
    """The training examples as genir.train_corpus encoded them before train_data (copied)."""
    gists, _ = load_docids(mc.gist_path(TASK, root=root), docs, TASK)
    queries = read_rows(mc.pseudo_queries_path(TASK, "QG", 2, root), ("instruction", "query", "labels"))
    queries += read_rows(mc.docasq_path(TASK, 2, root), ("instruction", "query", "labels"))
    examples = []
    for q in queries:
        doc_id = str(q["labels"][0]["id"])
        if doc_id not in gists:
            continue
        prompt = train_data.query_prompt(tokenizer, q["instruction"], q["query"], genir.C["MAX_INSTRUCTION_TOKENS"],
                                         genir.C["MAX_QUERY_TOKENS"])
        examples.append(lm.encode_example(tokenizer, prompt, gists[doc_id], genir.C["MAX_LEN"]))
    return queries, examples


def test_docasq_file_is_the_former_one(setup):
    instruction = read_jsonl(mc.queries_path(TASK, setup["root"]))[0]["instruction"]
    assert read_jsonl(mc.docasq_path(TASK, 2, setup["root"])) == reference_docasq(setup["docs"], instruction)


def test_loader_yields_the_former_batches(setup):
    """A full epoch (two, so the generator's state carries over alike) of sft.train_sft's loader over
    the new dataset equals the old DataLoader over the old list, tensor for tensor."""
    tok = setup["tokenizer"]
    queries, reference = reference_examples(tok, setup["docs"], setup["root"])
    examples = setup["examples"]
    assert len(examples) == len(reference) < len(queries)
    assert [examples[i] for i in range(len(examples))] == reference
    seed, size = genir.C["SEED"], genir.C["BATCH_SIZE"]
    old = torch.utils.data.DataLoader(reference, batch_size=size, shuffle=True,
                                      generator=torch.Generator().manual_seed(seed),
                                      collate_fn=lambda b: lm.collate(b, tok.pad_token_id))
    new = sft.sft_loader(examples, size, seed, tok.pad_token_id)
    for _ in range(2):
        batches = list(new)
        assert len(batches) == len(old)
        for a, b in zip(old, batches):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_docid_table_is_load_docids(setup):
    gists, warnings = load_docids(mc.gist_path(TASK, root=setup["root"]), setup["docs"], TASK)
    data = setup["supplier"].data
    assert dict(data.docs.items()) == gists and len(data.docs) == len(gists) == N_DOCS - NO_DOCID - 1
    assert data.meta["warnings"] == warnings and len(warnings) == 2
    assert "ghost" not in data.docs and setup["docs"][0]["id"] not in data.docs
    assert data.docs.find(setup["docs"][7]["id"]) == 7 and data.docs.find("ghost") == -1


def test_memory_mapped_bm25_is_the_in_memory_one_and_bm25s(setup):
    docs = setup["docs"]
    index = bm25.BM25Index(docs, "english", True)
    loaded = setup["supplier"].data.bm25
    queries = [q["query"] for q in read_jsonl(mc.queries_path(TASK, setup["root"]))]
    assert loaded.search(queries, k=100) == index.search(queries, k=100)
    assert not loaded.weights.data.flags.writeable  # the read-only mapping, not a copy
    reference = bm25s.BM25(k1=bm25.BM25_K1, b=bm25.BM25_B)
    tokens = bm25s.tokenize([d["doc"] for d in docs], stopwords=bm25.BM25_STOPWORDS,
                            stemmer=Stemmer.Stemmer("english"), show_progress=False)
    reference.index(tokens, show_progress=False)
    s = reference.scores
    rows = [tokens.vocab[t] for t in sorted(index.vocab, key=index.vocab.get)]
    weights = sp.csr_matrix((s["data"], s["indices"], s["indptr"]), shape=(len(s["indptr"]) - 1, len(docs)))
    assert (weights[rows] != index.weights).nnz == 0  # bit for bit


def test_ranking_groups_and_their_lazy_negatives(setup):
    """The groups are the former ones (each document's first training query); a group's negatives
    (drawn when it is first drawn, so not the former draw) come from its query's BM25 top-100 minus
    the positive, among documents with a DocID, and a fixed seed reproduces the batches."""
    tok, supplier, docs = setup["tokenizer"], setup["supplier"], setup["docs"]
    data, gists = supplier.data, dict(supplier.data.docs.items())
    queries, _ = reference_examples(tok, docs, setup["root"])
    first = {}
    for q in queries:
        if q["labels"][0]["id"] in gists:
            first.setdefault(q["labels"][0]["id"], q)
    groups = [(data.docs.ids[int(data.doc[g])], data.row(int(g))) for g in data.groups]
    assert groups == list(first.items())
    index = bm25.BM25Index(docs, "english", True)
    want = genir.C["GROUP_SIZE"] - 1
    for g, (positive, row) in enumerate(groups):
        negatives = supplier.negatives(g, row["query"], positive)
        top = [d for d in index.search([row["query"]], k=100)[0] if d != positive and d in gists]
        assert len(set(negatives)) == want and positive not in negatives and set(negatives) <= gists.keys()
        assert set(negatives) <= set(top) if len(top) >= want else set(top) <= set(negatives)
        found = supplier.top[g][supplier.top[g] >= 0].tolist()
        assert [index.doc_ids[i] for i in found] == index.search([row["query"]], k=100)[0]
        assert supplier.negatives(g, row["query"], positive) == negatives
    again = rank_groups.RankGroups(tok, docs, gists, data, setup["token_id"], genir.train_data_settings())
    rng, per_step = random.Random(genir.C["SEED"]), genir.C["BATCH_SIZE"] // genir.C["GROUP_SIZE"]
    for step in range(4 * genir.C["RANK_EVERY"]):
        batch, repeat = supplier(step), again(step)
        if step % genir.C["RANK_EVERY"]:
            assert batch is None and repeat is None
            continue
        expected = []
        for g in rng.sample(range(len(groups)), per_step):
            positive, row = groups[g]
            for doc_id in [positive] + supplier.negatives(g, row["query"], positive):
                expected.append(train_data.encode(tok, row, gists[doc_id], genir.train_data_settings()))
        expected = lm.collate(expected, tok.pad_token_id)
        assert batch["group_size"] == genir.C["GROUP_SIZE"] and batch["token_id"] == setup["token_id"]
        for key in ("input_ids", "attention_mask"):
            assert torch.equal(batch[key], expected[key]) and torch.equal(repeat[key], expected[key])


def test_rebuilt_when_a_source_changes(setup):
    data = setup["supplier"].data
    meta = os.path.join(data.folder, "meta.json")
    stamp = os.stat(meta).st_mtime_ns
    genir.training_queries(TASK, train_data.CorpusFile(mc.docs_path(TASK, setup["root"])))
    assert os.stat(meta).st_mtime_ns == stamp
    path = mc.gist_path(TASK, root=setup["root"])
    os.utime(path, ns=(stamp + 10 ** 9, stamp + 10 ** 9))
    rebuilt = genir.training_queries(TASK, train_data.CorpusFile(mc.docs_path(TASK, setup["root"])))
    assert os.stat(meta).st_mtime_ns != stamp and len(rebuilt) == len(setup["examples"])


@pytest.mark.parametrize("what, line, message", [
    ("queries", "{not json\n", r"queries\.jsonl:1: malformed JSON"),
    ("queries", '{"instruction": "", "query": "q", "labels": []}\n', r"queries\.jsonl:1: no label"),
    ("queries", '{"instruction": "", "labels": [{"id": "x"}]}\n', r"queries\.jsonl:1: missing field 'query'"),
    ("docs", '{"id": "same", "doc": "a"}\n{"id": "same", "doc": "b"}\n', "duplicate document id 'same'"),
])
def test_bad_data_is_a_clear_error(setup, tmp_path, what, line, message):
    paths = train_data.source_paths(TASK, genir.train_data_settings())
    saved = open(paths[what], encoding="utf-8").read()
    with open(paths[what], "w", encoding="utf-8") as f:
        f.write(line)
    try:
        with pytest.raises(DataError, match=message):
            train_data.prepare(TASK, train_data.CorpusFile(paths["docs"]), str(tmp_path / "set"),
                               genir.train_data_settings())
    finally:
        with open(paths[what], "w", encoding="utf-8") as f:
            f.write(saved)
