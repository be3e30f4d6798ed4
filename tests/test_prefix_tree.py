"""Prefix tree: shortest-unique-prefix semantics against a brute-force reference, order
independence, per-query removal without copies, save/load, bad input."""
import json
import logging
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from decoding import TrieLogitsProcessor
import prefix_tree
from device_trie import DeviceTrie, Removals
from prefix_tree import ARRAYS, PrefixTree
from reference_decoder import DictTrie, shortest_unique_paths

END = 7          # end token of the synthetic trees (tokens are 0..4)
VOCAB = END + 2  # one unused id above the end token

doc_seqs = st.dictionaries(
    keys=st.text(alphabet="abcdefgh", min_size=1, max_size=3),
    values=st.lists(st.integers(0, 4), min_size=1, max_size=5).map(tuple),
    min_size=1, max_size=25)


pytestmark = pytest.mark.usefixtures("one_thread")


def leaf_paths(tree):
    return {tuple(tree.leaf_tokens(leaf)): tree.leaf_docs(leaf) for leaf in range(tree.n_leaves)}


def arrays_of(tree):
    return {name: np.asarray(getattr(tree, name)) for name in ARRAYS}


def docid_words(doc_id):
    """DocID text from a qualified name: its parts split into lowercase words."""
    return " ".join(w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", doc_id))


def test_small_tree_by_hand():
    seqs = {"d1": (1, 2, 3), "d2": (1, 2, 4), "d3": (1, 5), "d4": (1, 2, 3), "d5": (6,), "d6": (1, 2)}
    tree = PrefixTree.from_token_ids(seqs.items(), END)
    assert leaf_paths(tree) == {(6, END): ["d5"], (1, 2, END): ["d6"], (1, 5, END): ["d3"],
                                (1, 2, 3, END): ["d1", "d4"], (1, 2, 4, END): ["d2"]}
    assert (tree.n_leaves, tree.doc_count, tree.max_depth) == (5, 6, 4)
    assert tree.next_tokens([]) == [1, 6]
    assert tree.next_tokens([1, 2]) == [3, 4, END]
    assert tree.next_tokens([6, END]) == [END]      # at a leaf
    assert tree.next_tokens([9, 1]) == [END]        # off the tree
    assert tree.next_tokens([1, 5, END, 3]) == [END]
    assert int(tree.leaf_count[0]) == 5


@settings(max_examples=150, deadline=None)
@given(doc_seqs)
def test_shortest_unique_prefix_semantics(seqs):
    tree = PrefixTree.from_token_ids(seqs.items(), END)
    expected = shortest_unique_paths(seqs, END)
    assert leaf_paths(tree) == expected
    assert tree.doc_count == len(seqs) and tree.n_leaves == len(expected)
    assert int(tree.leaf_count[0]) == tree.n_leaves
    assert tree.max_depth == max(map(len, expected))
    reference = DictTrie(expected, END)
    for path in expected:
        for cut in range(len(path) + 1):
            assert tree.next_tokens(path[:cut]) == reference.allowed(path[:cut])


@settings(max_examples=60, deadline=None)
@given(doc_seqs, st.randoms(use_true_random=False))
def test_insertion_order_does_not_matter(seqs, rnd):
    items = list(seqs.items())
    first = PrefixTree.from_token_ids(items, END)
    rnd.shuffle(items)
    second = PrefixTree.from_token_ids(items, END)
    for name, array in arrays_of(first).items():
        assert np.array_equal(array, getattr(second, name)), name


@settings(max_examples=60, deadline=None)
@given(doc_seqs)
def test_building_in_small_chunks_gives_the_same_tree(seqs):
    """The build splits its level passes and id packing into CHUNK rows: where the cuts fall changes nothing."""
    whole = PrefixTree.from_token_ids(seqs.items(), END)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prefix_tree, "CHUNK", 2)
        split = PrefixTree.from_token_ids(seqs.items(), END)
    for name, array in arrays_of(whole).items():
        assert np.array_equal(array, getattr(split, name)), name


@settings(max_examples=40, deadline=None)
@given(doc_seqs)
def test_device_walk_matches_tree(seqs):
    tree = PrefixTree.from_token_ids(seqs.items(), END)
    trie = DeviceTrie(tree, VOCAB)
    prefixes = [p[:cut] for p in leaf_paths(tree) for cut in range(len(p) + 1)] + [(8,), (1, 8), (0, END, 1)]
    width = max(map(len, prefixes))
    for length in range(width + 1):
        rows = [p for p in prefixes if len(p) == length]
        if not rows:
            continue
        nodes = trie.walk(torch.tensor(rows, dtype=torch.long).reshape(len(rows), length))
        assert nodes.tolist() == [tree.node_of(p) for p in rows]
        mask = trie.allowed_mask(nodes)
        for row, p in zip(mask, rows):
            assert torch.nonzero(row).flatten().tolist() == sorted(tree.next_tokens(p))


@settings(max_examples=60, deadline=None)
@given(doc_seqs, st.integers(0, 2 ** 31 - 1), st.integers(1, 3))
def test_sampling_without_replacement_until_exhausted(seqs, seed, n_queries):
    """Random logits, several queries: every draw is a stored DocID, never twice per query, no
    dead ends; after n_leaves draws a query is exhausted and only the end token remains."""
    tree = PrefixTree.from_token_ids(seqs.items(), END)
    trie = DeviceTrie(tree, VOCAB)
    removals = Removals(trie, n_queries)
    queries = torch.arange(n_queries)
    processor = TrieLogitsProcessor(trie, temperature=1.0, removals=removals, row_query=queries)
    generator = torch.Generator().manual_seed(seed)
    stored = set(leaf_paths(tree))
    decoded = [[] for _ in range(n_queries)]
    for _ in range(tree.n_leaves):
        assert not removals.exhausted.any()
        nodes = torch.zeros(n_queries, dtype=torch.long)
        paths = [[] for _ in range(n_queries)]
        while not trie.is_leaf(nodes).all():
            tokens = processor.sample(torch.randn(n_queries, VOCAB, generator=generator), nodes, generator)
            nodes = torch.where(trie.is_leaf(nodes), nodes, trie.advance(nodes, tokens))
            assert (nodes >= 0).all(), "walked off the tree"
            for q, tok in enumerate(tokens.tolist()):
                if len(paths[q]) == 0 or paths[q][-1] != END:
                    paths[q].append(tok)
        removals.add(queries, nodes)
        for q in range(n_queries):
            decoded[q].append(tuple(paths[q]))
    assert removals.exhausted.all()
    for q in range(n_queries):
        assert sorted(decoded[q]) == sorted(stored)
    scores = processor.process(torch.randn(n_queries, VOCAB), torch.zeros(n_queries, dtype=torch.long))
    assert torch.isfinite(scores).sum(1).tolist() == [1] * n_queries
    assert (scores.argmax(1) == END).all()


def test_removal_is_per_query():
    seqs = {"a": (1, 2), "b": (1, 3), "c": (4,)}
    tree = PrefixTree.from_token_ids(seqs.items(), END)
    trie = DeviceTrie(tree, VOCAB)
    removals = Removals(trie, 2)
    leaf = {tuple(tree.leaf_tokens(i)): int(tree.leaf_node[i]) for i in range(tree.n_leaves)}
    removals.add(torch.tensor([0, 0]), torch.tensor([leaf[(1, 2, END)], leaf[(1, 3, END)]]))
    root, node_1 = torch.tensor([0, 0]), tree.node_of([1])
    mask = trie.allowed_mask(root, torch.tensor([0, 1]), removals)
    assert torch.nonzero(mask[0]).flatten().tolist() == [4]        # subtree of 1 pruned for query 0
    assert torch.nonzero(mask[1]).flatten().tolist() == [1, 4]     # query 1 untouched
    mask = trie.allowed_mask(torch.tensor([node_1, node_1]), torch.tensor([1, 1]), removals)
    assert torch.nonzero(mask[0]).flatten().tolist() == [2, 3]
    assert removals.exhausted.tolist() == [False, False]
    assert int(tree.leaf_count[0]) == 3                             # the shared tree is unchanged


def test_save_and_mmap_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    seqs = {f"doc-{i}": tuple(rng.integers(0, 300, rng.integers(1, 7)).tolist()) for i in range(500)}
    seqs["doc-dup"] = seqs["doc-3"]
    tree = PrefixTree.from_token_ids(seqs.items(), 301)
    tree.save(tmp_path / "trie")
    tree.save(tmp_path / "trie")  # overwrites
    loaded = PrefixTree.load(tmp_path / "trie", mmap=True)
    assert all(isinstance(getattr(loaded, name), np.memmap) for name in ARRAYS)
    for name, array in arrays_of(tree).items():
        assert np.array_equal(array, getattr(loaded, name)), name
    assert (loaded.end_id, loaded.key_base, loaded.max_depth) == (tree.end_id, tree.key_base, tree.max_depth)
    assert leaf_paths(loaded) == leaf_paths(tree)
    nodes = torch.arange(-1, tree.n_nodes)
    assert torch.equal(DeviceTrie(loaded, 400).allowed_mask(nodes), DeviceTrie(tree, 400).allowed_mask(nodes))
    assert ["doc-3", "doc-dup"] in leaf_paths(loaded).values()


def test_loads_format_1(tmp_path):
    """A tree saved in format 1 (every index array int64) still loads and answers the same lookups."""
    seqs = {"a": (1, 2), "b": (1, 3), "c": (4,), "d": (4,)}
    tree = PrefixTree.from_token_ids(seqs.items(), END)
    path = tmp_path / "trie"
    tree.save(path)
    for name in ARRAYS[:-1]:
        np.save(path / f"{name}.npy", np.load(path / f"{name}.npy").astype(np.int64))
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    loaded = PrefixTree.load(path)
    assert loaded.leaf_node.dtype == np.int64 and leaf_paths(loaded) == leaf_paths(tree)
    trie = DeviceTrie(loaded, VOCAB)
    removals = Removals(trie, 1)
    removals.add(torch.tensor([0]), torch.as_tensor(loaded.leaf_node[:1]))  # leaf 0: (4, END)
    nodes = torch.arange(-1, tree.n_nodes)
    assert trie.leaf_index(torch.as_tensor(loaded.leaf_node)).tolist() == list(range(tree.n_leaves))
    assert torch.equal(trie.allowed_mask(nodes), DeviceTrie(tree, VOCAB).allowed_mask(nodes))
    assert torch.nonzero(trie.allowed_mask(torch.tensor([0]), torch.tensor([0]), removals)[0]).flatten().tolist() == [1]


def test_hot_nodes_use_dense_rows():
    """A node with many children is served from a dense row; results equal the CSR path."""
    seqs = {f"d{i}": (i % 1500, i // 1500) for i in range(3000)}
    tree = PrefixTree.from_token_ids(seqs.items(), 1600)
    trie = DeviceTrie(tree, 1601)
    assert len(trie.hot_nodes) == 1  # the root (1500 children)
    nodes = torch.tensor([0, tree.node_of([7]), -1])
    mask = trie.allowed_mask(nodes)
    assert torch.nonzero(mask[0]).flatten().tolist() == list(range(1500))
    assert torch.nonzero(mask[1]).flatten().tolist() == [0, 1]
    assert torch.nonzero(mask[2]).flatten().tolist() == [1600]


def test_build_with_tokenizer(tiny_model_path, demo_root):
    from transformers import AutoTokenizer

    import file_io
    import mair_config
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    docs = file_io.read_jsonl(mair_config.docs_path("PyDoc-Net"))[:400]
    pairs = [(d["id"], docid_words(d["id"].rsplit(".", 1)[-1])) for d in docs]
    tree = PrefixTree.build(pairs, tokenizer)
    assert tree.end_id == tokenizer.eos_token_id
    seqs = {doc: tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) for doc, text in pairs}
    expected = shortest_unique_paths(seqs, tokenizer.eos_token_id)
    assert leaf_paths(tree) == expected
    assert tree.n_leaves < tree.doc_count  # some DocIDs collide and share a leaf


class NoEosTokenizer:
    eos_token_id = None

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1] for _ in texts]}


def test_bad_input(caplog):
    with pytest.raises(ValueError, match="end_id"):
        PrefixTree.build([("a", "x")], NoEosTokenizer())
    assert PrefixTree.build([("a", "x")], NoEosTokenizer(), end_id=END).n_leaves == 1
    with pytest.raises(ValueError, match="end_id"):
        PrefixTree.from_token_ids([("a", [1])], None)
    with pytest.raises(ValueError, match="'b'"):
        PrefixTree.from_token_ids([("a", [1]), ("b", []), ("c", [2])], END)
    with pytest.raises(ValueError, match="duplicate document id 'a'"):
        PrefixTree.from_token_ids([("a", [1]), ("b", [2]), ("a", [3])], END)
    with pytest.raises(ValueError, match="'b'"):
        PrefixTree.from_token_ids([("a", [1]), ("b", [2, END, 3])], END)
    with pytest.raises(ValueError, match="'a'"):
        PrefixTree.from_token_ids([("a", [-1])], END)
    with pytest.raises(ValueError, match="no DocIDs"):
        PrefixTree.from_token_ids([], END)
    with pytest.raises(ValueError, match="vocabulary"):
        DeviceTrie(PrefixTree.from_token_ids([("a", [1])], END), END)
    caplog.set_level(logging.WARNING, logger="prefix_tree")
    tree = PrefixTree.from_token_ids([("a", [1]), ("b", []), ("c", [2])], END, skip_empty=True)
    assert tree.stats["skipped_empty"] == 1 and tree.doc_count == 2
    assert "'b'" in caplog.text
    caplog.clear()
    tree = PrefixTree.from_token_ids([("a", [1, 2, 3, 4, 5]), ("b", [1, 2, 3, 4, 6]), ("c", [2])], END, max_tokens=3)
    assert tree.stats["cut"] == 2 and "2 DocIDs longer than 3 tokens" in caplog.text
    assert leaf_paths(tree) == {(1, END): ["a", "b"], (2, END): ["c"]}  # cut to the same DocID
