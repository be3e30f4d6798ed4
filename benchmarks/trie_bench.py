"""Prefix-tree benchmark: build time and memory on random DocIDs, and batched lookups.

    python -m benchmarks.trie_bench [--docids 1000000] [--vocab 32000] [--rows 256] [--threads N]

DocIDs are random token sequences of MIN_LEN..MAX_LEN tokens. Prints its figures and, as its last
line, one JSON object: build_seconds, peak_rss_mb (peak growth of resident memory from the
finished inputs through the build, the device view and the lookups below), bytes_per_docid
(every array the decoder keeps, per DocID: the tree's arrays, leaf-to-document mapping included,
and the device view's tensors, each memory block once: on the CPU the view shares the tree's
arrays), lookup_batch_us (one step for a batch of `--rows` rows on the CPU: advance each row
along a token, then list the children of every row), mask_batch_us (the full (rows, vocab)
allowed-token mask of those rows). Times are the best of their repeats (as timeit advises):
other processes on a busy machine only ever add to a run.
"""
import argparse
import json
import logging
import os
import resource
import time

import numpy as np
import torch

from benchmarks.procmem import reset_peak, status_kb
from device_trie import DeviceTrie
from prefix_tree import ARRAYS, PrefixTree

MIN_LEN, MAX_LEN = 6, 12
LOOKUP_REPEATS = 200
MASK_REPEATS = 20
SEED = 0


def resident_bytes(tree, trie):
    """Bytes of the tree's arrays and the device view's tensors, each memory block once."""
    blocks = {}
    for name in ARRAYS:
        array = np.asarray(getattr(tree, name))
        start = array.__array_interface__["data"][0]
        blocks[start] = max(blocks.get(start, 0), array.nbytes)
    for value in vars(trie).values():
        if isinstance(value, torch.Tensor):
            blocks[value.data_ptr()] = max(blocks.get(value.data_ptr(), 0), value.untyped_storage().nbytes())
    return sum(blocks.values())


def time_us(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docids", type=int, default=1_000_000)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rng = np.random.default_rng(SEED)
    end_id = args.vocab - 1
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, args.docids)
    tokens = rng.integers(0, end_id, int(lengths.sum()), dtype=np.int32)
    doc_ids = [f"doc{i}" for i in range(args.docids)]
    starts = np.cumsum(lengths) - lengths
    picked = rng.integers(0, args.docids, args.rows)
    depth = torch.from_numpy(rng.integers(0, 3, args.rows))  # prefixes of 0..2 tokens: large fan-out near the root
    suffix = torch.from_numpy(np.stack([tokens[starts[picked] + step] for step in range(3)], 1).astype(np.int64))

    exact_peak = reset_peak()
    before = status_kb("VmRSS")
    start = time.perf_counter()
    tree = PrefixTree.from_arrays(doc_ids, tokens, lengths, end_id)
    build_seconds = time.perf_counter() - start
    trie = DeviceTrie(tree, args.vocab)
    nodes = torch.where(depth == 0, 0, trie.walk(suffix[:, :2]))
    next_tokens = suffix[:, 2]

    def lookup():
        trie.children(trie.advance(nodes, next_tokens))

    lookup_us = time_us(lookup, LOOKUP_REPEATS)
    mask_us = time_us(lambda: trie.allowed_mask(nodes), MASK_REPEATS)
    peak = status_kb("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_rss_mb = (peak - before) / 1024
    resident = resident_bytes(tree, trie)
    stats = {
        "docids": args.docids, "nodes": tree.n_nodes, "leaves": tree.n_leaves, "depth": tree.max_depth,
        "build_seconds": round(build_seconds, 2), "peak_rss_mb": round(peak_rss_mb, 1),
        "bytes_per_docid": round(resident / args.docids, 1), "lookup_batch_us": round(lookup_us, 1),
        "mask_batch_us": round(mask_us, 1), "rows": args.rows, "vocab": args.vocab,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
    }
    print(f"built {args.docids:,} DocIDs ({MIN_LEN}-{MAX_LEN} tokens, vocab {args.vocab}) in {build_seconds:.2f} s; "
          f"peak RSS growth over build, device view and lookups {peak_rss_mb:.0f} MB "
          f"({'VmHWM' if exact_peak else 'ru_maxrss, an upper bound'})")
    print(f"tree: {tree.n_nodes:,} nodes, {tree.n_leaves:,} leaves, depth {tree.max_depth}; "
          f"{resident / 2 ** 20:.1f} MB resident for the decoder = {resident / args.docids:.1f} bytes per DocID")
    print(f"batched lookup ({args.rows} rows, advance + children): {lookup_us:.1f} us; "
          f"allowed mask ({args.rows} x {args.vocab}): {mask_us:.1f} us (best of repeats)")
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
