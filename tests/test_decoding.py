"""Batched trie-constrained decoding against a plain per-query reference on the tiny model."""
import dataclasses
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

import decoding
import file_io
import mair_config
import sampling
from decoding import DecodeSettings, TrieLogitsProcessor, decode
from device_trie import DeviceTrie, Removals, _live_candidates, _RootCandidates
from prefix_tree import PrefixTree
from reference_decoder import DictTrie, reference_decode, shortest_unique_paths
from sampling import reverse_annealed_temperatures

TASK = "PyDoc-Net"
N_DOCS, N_QUERIES, K = 300, 5, 15
# The paper's decoding settings (genir's defaults), which each test changes where it needs to.
PAPER = DecodeSettings(mode="reverse_annealed", K=100, slope=10.0, midpoint=0.1, t_max=1.5, top_k=50, top_p=0.9,
                       nucleus_temperature=1.0, num_beams=None, beam_token_budget=1 << 17, draws_per_round=1,
                       max_results=100, batch_size=32, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def docid_words(doc_id):
    """DocID text from a qualified name without its module: the parts split into lowercase words."""
    name = doc_id.split(".", 1)[-1]
    return " ".join(w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name))


class Setup:
    def __init__(self, model_path):
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        self.end = self.tokenizer.eos_token_id
        docs = file_io.read_jsonl(mair_config.docs_path(TASK))[:N_DOCS]
        self.pairs = [(d["id"], docid_words(d["id"])) for d in docs]
        self.tree = PrefixTree.build(self.pairs, self.tokenizer)
        seqs = {doc: tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) for doc, text in self.pairs}
        self.paths = shortest_unique_paths(seqs, self.end)
        queries = file_io.read_jsonl(mair_config.queries_path(TASK))[::40][:N_QUERIES]
        self.prompts = [self.prompt(q["instruction"] + "\n" + q["query"]) for q in queries]

    def prompt(self, text):
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)

    def small_tree(self, n):
        return PrefixTree.build(self.pairs[:n], self.tokenizer)


@pytest.fixture(scope="module")
def setup(tiny_model_path, demo_root):
    return Setup(tiny_model_path)


@pytest.fixture(scope="module")
def reference(setup):
    """Per query: the K DocID paths of greedy iterative decoding, one generate call each."""
    trie = DictTrie(setup.paths, setup.end)
    return [reference_decode(setup.model, p, trie, [0.0] * K, setup.tree.max_depth, setup.tokenizer.pad_token_id)
            for p in setup.prompts]


def settings(**changes):
    """The PAPER settings with `changes`."""
    return dataclasses.replace(PAPER, **changes)


def paths_of(tree, results):
    return [[tuple(tree.leaf_tokens(leaf)) for leaf in r.leaves] for r in results]


def test_schedule():
    t = PAPER.schedule()
    assert len(t) == 100 and t[0] == 0.0
    assert np.all(np.diff(t) > 0)
    assert [round(float(t[i]), 3) for i in (10, 20, 99)] == [0.474, 0.948, 1.5]
    assert sampling.annealed_temperature(100, PAPER.K, PAPER.slope, PAPER.midpoint, PAPER.t_max) == pytest.approx(1.5)
    assert sampling.annealed_temperature(7, K=7, k=3, m=0.4, t_max=2.0) == pytest.approx(2.0)
    assert reverse_annealed_temperatures(K=10, k=PAPER.slope, m=PAPER.midpoint, t_max=0.0).max() == 0.0


def test_iterative_greedy_matches_reference(setup, reference):
    results = decode(setup.model, setup.tree, setup.prompts,
                     settings(mode="iterative_greedy", K=K, batch_size=3, max_results=20), progress=False)
    assert paths_of(setup.tree, results) == reference
    for result, ref_paths in zip(results, reference):
        expected = [doc for path in ref_paths for doc in setup.paths[path]][:20]
        assert [doc for doc, _ in result.ranking] == expected
        assert [score for _, score in result.ranking] == [1 / r for r in range(1, len(expected) + 1)]


@pytest.mark.parametrize("draws", [1, 3])
def test_reverse_annealed_at_zero_temperature_matches_reference(setup, reference, draws):
    results = decode(setup.model, setup.tree, setup.prompts,
                     settings(mode="reverse_annealed", K=K, t_max=0.0, draws_per_round=draws), progress=False)
    assert paths_of(setup.tree, results) == reference


def test_frequent_cache_crops_do_not_change_results(setup, reference, monkeypatch):
    monkeypatch.setattr(decoding, "COLUMN_BUDGET", 2)
    results = decode(setup.model, setup.tree, setup.prompts, settings(mode="iterative_greedy", K=K), progress=False)
    assert paths_of(setup.tree, results) == reference


def test_greedy_is_the_first_reference_docid(setup, reference):
    results = decode(setup.model, setup.tree, setup.prompts, settings(mode="greedy"), progress=False)
    assert paths_of(setup.tree, results) == [r[:1] for r in reference]


def test_sampling_is_valid_and_reproducible(setup, reference):
    def run(seed, draws=1):
        return decode(setup.model, setup.tree, setup.prompts, settings(K=K, seed=seed, draws_per_round=draws),
                      progress=False)

    first, again, other = run(0), run(0), run(1)
    assert [r.leaves for r in first] == [r.leaves for r in again]
    assert [r.leaves for r in first] != [r.leaves for r in other]
    for results in (first, other, run(0, draws=4)):
        for result, ref_paths in zip(results, reference):
            assert len(result.leaves) == K == len(set(result.leaves))
            assert tuple(setup.tree.leaf_tokens(result.leaves[0])) == ref_paths[0]  # t_0 = 0: greedy
            assert all(tuple(setup.tree.leaf_tokens(leaf)) in setup.paths for leaf in result.leaves)
    nucleus = decode(setup.model, setup.tree, setup.prompts, settings(mode="nucleus", K=K), progress=False)
    assert all(len(r.leaves) == K == len(set(r.leaves)) for r in nucleus)


@pytest.mark.parametrize("mode", ["reverse_annealed", "nucleus"])
def test_a_query_draws_the_same_docids_in_any_batch(setup, mode):
    """Sampling noise depends on the query's key, not on its batch: sharding cannot change results."""
    keys = [f"q{i}" for i in range(len(setup.prompts))]
    whole = decode(setup.model, setup.tree, setup.prompts, settings(mode=mode, K=K), keys=keys, progress=False)
    order = list(reversed(range(len(setup.prompts))))
    split = decode(setup.model, setup.tree, [setup.prompts[i] for i in order], settings(mode=mode, K=K, batch_size=2),
                   keys=[keys[i] for i in order], progress=False)
    assert [whole[i].leaves for i in order] == [r.leaves for r in split]
    other = decode(setup.model, setup.tree, setup.prompts, settings(mode=mode, K=K, seed=1), keys=keys,
                   progress=False)
    assert [r.leaves for r in whole] != [r.leaves for r in other]


def test_counter_uniform_is_uniform_and_keyed():
    from sampling import counter_uniform
    u = counter_uniform(torch.arange(200_000), torch.tensor(3), torch.tensor(0), torch.tensor(11))
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert torch.histc(u, 10, 0, 1).min() > 19_000
    assert torch.equal(u[:5], counter_uniform(torch.arange(5), torch.tensor(3), torch.tensor(0), torch.tensor(11)))
    assert not torch.equal(u[:5], counter_uniform(torch.arange(5), torch.tensor(3), torch.tensor(1), torch.tensor(11)))


@pytest.mark.parametrize("mode,draws", [("iterative_greedy", 1), ("nucleus", 1), ("reverse_annealed", 1),
                                        ("reverse_annealed", 4), ("beam", 1)])
def test_exhaustion_returns_every_leaf_once(setup, mode, draws):
    tree = setup.small_tree(12)
    results = decode(setup.model, tree, setup.prompts[:3], settings(mode=mode, K=30, draws_per_round=draws),
                     progress=False)
    for result in results:
        assert sorted(result.leaves) == list(range(tree.n_leaves))
        assert sorted(doc for doc, _ in result.ranking) == sorted(doc for doc, _ in setup.pairs[:12])


def sequence_logprobs(model, prompt, paths):
    """Exact log-prob of each path after the prompt, one teacher-forced forward per path."""
    out = []
    for path in paths:
        ids = torch.tensor([prompt + list(path)])
        logprobs = model(ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        out.append(float(logprobs.gather(1, torch.tensor(path)[:, None]).sum()))
    return out


def test_beam_search_finds_the_best_docids(setup):
    """With at least as many beams as leaves nothing is pruned: the top K by log-prob come out."""
    tree = setup.small_tree(40)
    results = decode(setup.model, tree, setup.prompts[:2], settings(mode="beam", K=8, num_beams=tree.n_leaves),
                     progress=False)
    for prompt, result in zip(setup.prompts[:2], results):
        with torch.no_grad():
            scores = sequence_logprobs(setup.model, prompt, [tree.leaf_tokens(i) for i in range(tree.n_leaves)])
        assert result.leaves == sorted(range(tree.n_leaves), key=lambda i: -scores[i])[:8]
    narrow = decode(setup.model, tree, setup.prompts[:2], settings(mode="beam", K=8, num_beams=4), progress=False)
    assert all(0 < len(r.leaves) <= 8 and len(set(r.leaves)) == len(r.leaves) for r in narrow)  # up to K


def test_beam_search_in_chunks_within_the_token_budget(setup, monkeypatch):
    """Beam search splits a batch so that rows x longest prompt stay within beam_token_budget (a
    query alone over it runs alone); the results equal one unlimited batch."""
    tree, beams = setup.small_tree(40), 6
    chunks, search = [], decoding._beam_search
    monkeypatch.setattr(decoding, "_beam_search", lambda model, trie, prompts, *args:
                        chunks.append((len(prompts), max(map(len, prompts)))) or search(model, trie, prompts, *args))

    def run(budget):
        chunks.clear()
        return [r.leaves for r in decode(setup.model, tree, setup.prompts,
                                         settings(mode="beam", K=8, num_beams=beams, beam_token_budget=budget),
                                         progress=False)]

    whole = run(None)
    assert [n for n, _ in chunks] == [len(setup.prompts)]
    assert run(1) == whole and [n for n, _ in chunks] == [1] * len(setup.prompts)
    budget = 2 * beams * max(map(len, setup.prompts))
    assert run(budget) == whole and 1 < len(chunks) < len(setup.prompts)
    assert sum(n for n, _ in chunks) == len(setup.prompts)
    assert all(n * beams * longest <= budget for n, longest in chunks)


def left_pad(prompts, pad_id):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    return ids, (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()


def test_processor_inside_generate(setup):
    """Left-padded batch through transformers generate: greedy equals prefix_allowed_tokens_fn,
    and sampled rows (finished ones padded) are stored DocIDs."""
    pad = setup.tokenizer.pad_token_id
    ids, mask = left_pad(setup.prompts[:4], pad)
    width = ids.shape[1]
    trie = DeviceTrie(setup.tree, setup.model.config.vocab_size)
    reference = DictTrie(setup.paths, setup.end)
    common = dict(attention_mask=mask, max_new_tokens=setup.tree.max_depth, eos_token_id=setup.end,
                  pad_token_id=pad, top_k=None, top_p=None, temperature=None)
    with torch.no_grad():
        expected = setup.model.generate(ids, do_sample=False, **common,
                                        prefix_allowed_tokens_fn=lambda b, row: reference.allowed(row[width:].tolist()))
        got = setup.model.generate(ids, do_sample=False, **common,
                                   logits_processor=LogitsProcessorList([TrieLogitsProcessor(trie, width)]))
        assert torch.equal(got, expected)
        processor = TrieLogitsProcessor(trie, width, temperature=[1.5, 1.0, 0.0, 1.0], top_k=[0, 50, 0, 3],
                                        top_p=[1.0, 0.9, 1.0, 0.5])
        torch.manual_seed(0)
        common.update(top_k=0, top_p=1.0, temperature=1.0)
        sampled = setup.model.generate(ids, do_sample=True, logits_processor=LogitsProcessorList([processor]),
                                       **common)
    paths = [tuple(row[:row.index(setup.end) + 1]) for row in sampled[:, width:].tolist()]
    assert all(path in setup.paths for path in paths)
    greedy_row = expected[2, width:].tolist()
    assert paths[2] == tuple(greedy_row[:greedy_row.index(setup.end) + 1])


def test_warp_per_row():
    tree = PrefixTree.from_token_ids([(str(i), [i]) for i in range(5)], 6)
    trie = DeviceTrie(tree, 8)
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05, 0.5, 0.01, 0.5]])).repeat(5, 1)
    processor = TrieLogitsProcessor(trie, temperature=[0.0, 1.0, 1.0, 1.0, 2.0], top_k=[0, 0, 2, 0, 0],
                                    top_p=[1.0, 1.0, 1.0, 0.6, 1.0])
    out = processor.process(logits, torch.zeros(5, dtype=torch.long))
    kept = [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in out]
    assert kept == [[0], [0, 1, 2, 3, 4], [0, 1], [0, 1], [0, 1, 2, 3, 4]]
    assert torch.allclose(out[4, :5], logits[4, :5] / 2)
    assert torch.allclose(out[1, :5], logits[1, :5])
    off_tree = processor.process(logits, torch.tensor([-1, 1, 1, 1, 1]))  # nodes 1.. are leaves
    assert (off_tree.argmax(1) == 6).all() and torch.isfinite(off_tree).sum() == 5


@pytest.mark.parametrize("width", [None, 3])
def test_sparse_candidates_match_the_dense_mask(width):
    """The decoder's per-node candidate lists hold exactly the tokens the dense mask allows."""
    rng = np.random.default_rng(0)
    end = 30
    seqs = {f"d{i}": tuple(rng.integers(0, end, rng.integers(1, 5)).tolist()) for i in range(400)}
    tree = PrefixTree.from_token_ids(seqs.items(), end)
    trie = DeviceTrie(tree, end + 1)
    n_queries = 3
    removals = Removals(trie, n_queries)
    for q, n in enumerate([0, 60, 200]):
        leaves = rng.choice(tree.n_leaves, n, replace=False)
        removals.add(torch.full((n,), q), torch.as_tensor(tree.leaf_node[leaves]))
    inner = torch.arange(tree.n_nodes)[~trie.is_leaf(torch.arange(tree.n_nodes))]
    queries = torch.as_tensor(rng.integers(0, n_queries, 200))
    nodes = inner[torch.as_tensor(rng.integers(0, len(inner), 200))]
    nodes[:40] = 0
    alive = ~removals.is_dead(queries, nodes)
    queries, nodes = queries[alive], nodes[alive]
    rows = torch.arange(len(nodes))
    logits, first_logits = torch.randn(len(nodes), end + 1), torch.randn(len(nodes), end + 1)
    values, children = _live_candidates(trie, removals, _RootCandidates(trie, first_logits), logits, rows, queries,
                                        nodes, width)
    dense = torch.where((nodes == 0)[:, None], first_logits, logits)
    dense = dense.masked_fill(~trie.allowed_mask(nodes, queries, removals), float("-inf"))
    for row in range(len(nodes)):
        expected = dense[row].sort(descending=True).values
        expected = expected[torch.isfinite(expected)][:width]
        got = values[row][torch.isfinite(values[row])]
        assert torch.equal(got, expected)
        tokens = trie.token[children[row][:len(got)]].long()
        assert torch.equal(dense[row, tokens], got)
        assert (trie.parent[children[row][:len(got)]] == nodes[row]).all()


def test_bad_arguments(setup):
    with pytest.raises(ValueError, match="unknown decoding mode"):
        decode(setup.model, setup.tree, setup.prompts, settings(mode="topk"))
    with pytest.raises(ValueError, match="positive"):
        decode(setup.model, setup.tree, setup.prompts, settings(K=0))
    with pytest.raises(ValueError, match="vocabulary"):
        decode(setup.model, DeviceTrie(setup.tree, setup.model.config.vocab_size + 1), setup.prompts, settings())
    assert decode(setup.model, setup.tree, [], settings(), progress=False) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16(setup, reference):
    model = AutoModelForCausalLM.from_pretrained(setup.model.name_or_path, dtype=torch.float32).to("cuda")
    greedy = decode(model, setup.tree, setup.prompts, settings(mode="iterative_greedy", K=K), progress=False)
    assert paths_of(setup.tree, greedy) == reference
    model = model.to(torch.bfloat16)
    sampled = decode(model, setup.tree, setup.prompts, settings(K=K, draws_per_round=2), progress=False)
    assert all(len(r.leaves) == K == len(set(r.leaves)) for r in sampled)
    beams = decode(model, setup.tree, setup.prompts, settings(mode="beam", K=K), progress=False)
    assert all(0 < len(r.leaves) <= K and len(set(r.leaves)) == len(r.leaves) for r in beams)
