"""vLLM adapter logic with fake BatchUpdate / SamplingParams objects (vLLM itself is not needed)."""
import enum
import importlib.util
from types import SimpleNamespace

import pytest
import torch

import vllm_trie
from prefix_tree import PrefixTree

END, VOCAB = 9, 12
SEQS = {"a": (1, 2, 3), "b": (1, 2, 4), "c": (1, 5), "d": (6,), "e": (7, 8)}


class Move(enum.Enum):
    UNIDIRECTIONAL = 0
    SWAP = 1


def params(**extra):
    return SimpleNamespace(extra_args=extra)


def update(removed=(), added=(), moved=(), batch_size=4):
    return SimpleNamespace(batch_size=batch_size, removed=list(removed), added=list(added), moved=list(moved))


@pytest.fixture()
def tree_dir(tmp_path):
    tree = PrefixTree.from_token_ids(SEQS.items(), END)
    tree.save(tmp_path / "trie")
    return str(tmp_path / "trie"), tree


def allowed(logits_row):
    return torch.isfinite(logits_row).nonzero().flatten().tolist()


def leaf_of(tree, doc):
    return next(leaf for leaf in range(tree.n_leaves) if doc in tree.leaf_docs(leaf))


def test_masks_follow_tokens_removals_and_batch_changes(tree_dir):
    path, tree = tree_dir
    state = vllm_trie.TrieBatchState()
    assert state.is_argmax_invariant() is False
    out0, out1, out2 = [], [], []
    state.update_state(update(added=[(0, params(gr_trie=path, gr_removed=[leaf_of(tree, "c")]), [5], out0),
                                     (1, params(), [5], out1),
                                     (2, params(gr_trie=path), [5], out2)]))
    logits = state.apply(torch.zeros(3, VOCAB))
    assert allowed(logits[0]) == [1, 6, 7] and allowed(logits[2]) == [1, 6, 7]
    assert allowed(logits[1]) == list(range(VOCAB))          # no trie: untouched
    out0.append(1)
    out2.append(1)
    state.update_state(None)
    logits = state.apply(torch.zeros(3, VOCAB))
    assert allowed(logits[0]) == [2]                          # "c" (1, 5) was decoded by request 0
    assert allowed(logits[2]) == [2, 5]
    out2.extend([2, 4])                                       # two tokens at once, then a leaf
    state.apply(torch.zeros(3, VOCAB))
    out2.append(END)
    assert allowed(state.apply(torch.zeros(3, VOCAB))[2]) == [END]
    # Request 0 moves to slot 3, then swaps with request 2's slot.
    state.update_state(update(moved=[(0, 3, Move.UNIDIRECTIONAL)]))
    logits = state.apply(torch.zeros(4, VOCAB))
    assert allowed(logits[3]) == [2] and allowed(logits[0]) == list(range(VOCAB))
    state.update_state(update(moved=[(3, 2, Move.SWAP)]))
    logits = state.apply(torch.zeros(4, VOCAB))
    assert allowed(logits[2]) == [2] and allowed(logits[3]) == [END]
    state.update_state(update(removed=[2, 3]))
    assert torch.equal(state.apply(torch.zeros(4, VOCAB)), torch.zeros(4, VOCAB))


def test_readded_request_is_rewalked_from_its_whole_output(tree_dir):
    path, _ = tree_dir
    state = vllm_trie.TrieBatchState()
    state.update_state(update(added=[(0, params(gr_trie=path), [5], [1, 2])]))  # e.g. after preemption
    assert allowed(state.apply(torch.zeros(1, VOCAB))[0]) == [3, 4]


def test_placeholder_tokens_are_refused(tree_dir):
    path, _ = tree_dir
    state = vllm_trie.TrieBatchState()
    state.update_state(update(added=[(0, params(gr_trie=path), [5], [1, -1])]))
    with pytest.raises(RuntimeError, match="placeholder"):
        state.apply(torch.zeros(1, VOCAB))


def test_validate_params(tree_dir, tmp_path):
    path, tree = tree_dir
    vllm_trie.TrieBatchState.validate_params(params())
    vllm_trie.TrieBatchState.validate_params(params(gr_trie=path, gr_removed=[0, 1]))
    with pytest.raises(ValueError, match="saved prefix tree"):
        vllm_trie.TrieBatchState.validate_params(params(gr_trie=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="leaf ids"):
        vllm_trie.TrieBatchState.validate_params(params(gr_trie=path, gr_removed=["a"]))
    state = vllm_trie.TrieBatchState()
    state.update_state(update(added=[(0, params(gr_trie=path, gr_removed=[tree.n_leaves]), [5], [])]))
    with pytest.raises(ValueError, match="not in the tree"):
        state.apply(torch.zeros(1, VOCAB))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_is_imported_only_on_demand():
    with pytest.raises(ImportError):
        vllm_trie.TrieLogitsProcessorV1
