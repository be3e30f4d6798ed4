"""Decoding benchmark on a random model: the batched reverse-annealed decoder, against the
per-query reference (one transformers `generate` call per DocID with `prefix_allowed_tokens_fn`
and a dict trie copied per query, as in the original code) and against unconstrained batched
sampling of the same number of tokens (same prompt cache, temperatures, top-k and top-p, no trie).

    python -m benchmarks.decode_bench [--queries 64] [--docids 10000] [--K 100] [--threads N]

The model is a randomly initialised 4-layer, 256-wide Llama (vocab 8192); DocIDs are random
token sequences (Zipf-distributed tokens, so that prefixes are shared as in text). The reference
is timed on a few queries and iterations (evenly spread over the schedule) and extrapolated to K
iterations per query. Prints its figures and, as its last line, one JSON object.
"""
import argparse
import copy
import dataclasses
import json
import logging
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import genir
from decoding import PromptBatch, decode
from sampling import RowWarper
from prefix_tree import PrefixTree
from reference_decoder import DictTrie, reference_decode

VOCAB, HIDDEN, LAYERS, HEADS = 8192, 256, 4, 4
DOCID_LEN = (6, 12)     # tokens per DocID, inclusive
PROMPT_LEN = (24, 48)   # tokens per prompt, inclusive
ZIPF_EXPONENT = 1.0
SEED = 0

log = logging.getLogger("decode_bench")


def random_model():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=0,
                         eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 2)
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).eval()


def random_docids(n, rng):
    """n random DocIDs over tokens 0..VOCAB-3 (Zipf frequencies); the last id is the end token."""
    weights = 1.0 / np.arange(1, VOCAB - 1) ** ZIPF_EXPONENT
    order = rng.permutation(VOCAB - 2)
    lengths = rng.integers(DOCID_LEN[0], DOCID_LEN[1] + 1, n)
    tokens = order[rng.choice(VOCAB - 2, int(lengths.sum()), p=weights / weights.sum())]
    return PrefixTree.from_arrays([f"doc{i}" for i in range(n)], tokens, lengths, VOCAB - 1)


def unconstrained(model, prompts, settings, steps, seed):
    """The same sampling without a trie: per round one DocID per row, `steps` tokens long."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    batch = PromptBatch(model, prompts)
    for t, n_steps in zip(settings.schedule(), steps):
        warper = RowWarper(float(t), settings.top_k, settings.top_p, model.device)
        logits = batch.first_logits
        for depth in range(n_steps):
            tokens = warper.sample(logits, generator)
            if depth + 1 < n_steps:
                logits = batch.step(tokens, depth)
        batch.rewind()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--docids", type=int, default=10_000)
    parser.add_argument("--K", type=int, default=100)
    parser.add_argument("--draws_per_round", type=int, default=1)
    parser.add_argument("--ref_queries", type=int, default=2, help="queries timed with the reference")
    parser.add_argument("--ref_iterations", type=int, default=10, help="iterations timed per reference query")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(SEED)
    model = random_model()
    tree = random_docids(args.docids, rng)
    prompts = [rng.integers(1, VOCAB - 2, rng.integers(PROMPT_LEN[0], PROMPT_LEN[1] + 1)).tolist()
               for _ in range(args.queries)]
    settings = genir.decode_settings(mode="reverse_annealed", K=args.K, batch_size=args.queries,
                                     draws_per_round=args.draws_per_round)
    temperatures = settings.schedule()
    print(f"model: random Llama {LAYERS} layers x {HIDDEN} wide, vocab {VOCAB}; {args.docids:,} DocIDs -> "
          f"{tree.n_leaves:,} leaves, {tree.n_nodes:,} nodes, depth {tree.max_depth}; {args.queries} queries, "
          f"K={args.K}; {torch.get_num_threads()} threads")

    forwards = [0]
    model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    with torch.inference_mode():
        decode(model, tree, prompts[:4], dataclasses.replace(settings, K=2), progress=False)  # warm-up
        forwards[0] = 0
        start = time.perf_counter()
        results = decode(model, tree, prompts, settings, progress=False)
        batched = time.perf_counter() - start
        batched_forwards = forwards[0]
        # The same number of tokens without a trie: K rounds of equal-length DocIDs for every query.
        tokens = sum(len(tree.leaf_tokens(leaf)) for r in results for leaf in r.leaves)
        steps = np.diff(np.floor(np.arange(args.K + 1) * tokens / args.queries / args.K)).astype(int).clip(min=1)
        forwards[0] = 0
        start = time.perf_counter()
        unconstrained(model, prompts, settings, steps, SEED)
        free = time.perf_counter() - start
        free_forwards = forwards[0]

    trie = DictTrie({tuple(tree.leaf_tokens(leaf)) for leaf in range(tree.n_leaves)}, tree.end_id)
    start = time.perf_counter()
    copy.deepcopy(trie)
    copy_seconds = time.perf_counter() - start
    picked = temperatures[np.linspace(0, args.K - 1, args.ref_iterations).astype(int)]
    start = time.perf_counter()
    for prompt in prompts[:args.ref_queries]:
        reference_decode(model, prompt, trie, picked, tree.max_depth, model.config.pad_token_id,
                         top_k=settings.top_k, top_p=settings.top_p)
    measured = time.perf_counter() - start
    per_iteration = (measured / args.ref_queries - copy_seconds) / args.ref_iterations
    reference_per_query = copy_seconds + args.K * per_iteration

    per_query = batched / args.queries
    stats = {
        "queries": args.queries, "docids": args.docids, "K": args.K, "draws_per_round": args.draws_per_round,
        "threads": torch.get_num_threads(), "tokens_decoded": tokens, "batched_seconds": round(batched, 3),
        "unconstrained_seconds": round(free, 3), "forward_passes": batched_forwards,
        "unconstrained_forward_passes": free_forwards,
        "reference_seconds_per_query": round(reference_per_query, 3),
        "reference_measured": f"{args.ref_queries} queries x {args.ref_iterations} iterations, extrapolated to K",
        "seconds_per_query": round(per_query, 4),
        "speedup_vs_reference": round(reference_per_query / per_query, 1),
        "overhead_vs_unconstrained": round(batched / free, 3),
        "cost_per_forward_pass_ratio": round((batched / batched_forwards) / (free / free_forwards), 3),
    }
    print(f"batched decoder: {batched:.2f} s for {args.queries} queries = {per_query * 1000:.1f} ms/query "
          f"({tokens:,} DocID tokens, {batched_forwards} forward passes incl. the prompt)")
    print(f"unconstrained batched sampling of {int(steps.sum()) * args.queries:,} tokens ({args.K} rounds of "
          f"{steps.mean():.2f} tokens per query, {free_forwards} forward passes): {free:.2f} s -> overhead "
          f"x{batched / free:.2f} (below 1: a complete DocID's end token is forced, so it needs no forward "
          f"pass, and rows never wait for each other); per forward pass, trie bookkeeping included: "
          f"x{(batched / batched_forwards) / (free / free_forwards):.2f}")
    print(f"per-query reference: {per_iteration * 1000:.1f} ms per generate call + {copy_seconds * 1000:.0f} ms trie "
          f"copy = {reference_per_query:.2f} s/query (timed {args.ref_queries} queries x {args.ref_iterations} "
          f"iterations, extrapolated to K={args.K}) -> speedup x{reference_per_query / per_query:.0f}")
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
