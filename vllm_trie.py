"""vLLM adapter of the prefix-tree constraint: a batch-level logits processor for vLLM's V1 model
runner (vLLM >= 0.10; on releases whose default is Model Runner V2, set VLLM_USE_V2_MODEL_RUNNER=0).

    from vllm import LLM, SamplingParams
    llm = LLM(model=path, logits_processors=["vllm_trie:TrieLogitsProcessorV1"])
    params = SamplingParams(temperature=t, top_k=50, top_p=0.9, max_tokens=tree.max_depth,
                            stop_token_ids=[tree.end_id], detokenize=False,
                            extra_args={"gr_trie": "/path/to/saved/tree", "gr_removed": [leaf, ...]})

A request names a saved PrefixTree (loaded once per engine process, memory-mapped) and the
leaves it has already decoded, which are removed for it alone; requests without "gr_trie" are
left untouched. Pass the class explicitly (as above): vLLM then keeps the output token lists
exact under async scheduling. vLLM is imported only when the class is first asked for, so the
logic (`TrieBatchState`) runs and is tested without it.
"""
import functools
import os

import torch

from prefix_tree import DeviceTrie, PrefixTree, Removals

TRIE_ARG = "gr_trie"        # SamplingParams.extra_args key: directory of a saved PrefixTree
REMOVED_ARG = "gr_removed"  # leaves this request must not decode again
PLACEHOLDER = -1            # vLLM's not-yet-known token under async scheduling


@functools.lru_cache(maxsize=None)
def _tree(path):
    return PrefixTree.load(path, mmap=True)


@functools.lru_cache(maxsize=None)
def _device_trie(path, vocab_size, device):
    return DeviceTrie(_tree(path), vocab_size, device)


class _Request:
    def __init__(self, path, removed, output):
        self.path, self.removed, self.output = path, list(removed), output  # `output`: vLLM's live list
        self.node, self.seen = 0, 0  # trie node after the first `seen` output tokens


class TrieBatchState:
    """The processor's logic: per batch row, the request's trie, removed leaves and current node.

    `update_state` follows vLLM's BatchUpdate (removed, then added, then moved); a request added
    again (for example after preemption) is re-walked from its whole output. `apply` advances every
    row along its new tokens and masks its logits row to the allowed next tokens.
    """

    def __init__(self, vllm_config=None, device="cpu", is_pin_memory=False):
        self.device = torch.device(device)
        self.requests = {}  # batch index -> _Request
        self.groups = None  # per trie: (DeviceTrie, batch indices, Removals), rebuilt on batch changes

    @classmethod
    def validate_params(cls, sampling_params):
        args = sampling_params.extra_args or {}
        if TRIE_ARG not in args:
            return
        path = args[TRIE_ARG]
        if not isinstance(path, str) or not os.path.isfile(os.path.join(path, "meta.json")):
            raise ValueError(f"extra_args[{TRIE_ARG!r}] must be the directory of a saved prefix tree, got {path!r}")
        removed = args.get(REMOVED_ARG, [])
        if not isinstance(removed, (list, tuple)) or not all(isinstance(x, int) and x >= 0 for x in removed):
            raise ValueError(f"extra_args[{REMOVED_ARG!r}] must be a list of leaf ids")

    def is_argmax_invariant(self):
        return False

    def update_state(self, batch_update):
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            args = (params.extra_args or {}) if params is not None else {}
            if TRIE_ARG in args:
                self.requests[index] = _Request(args[TRIE_ARG], args.get(REMOVED_ARG, []), output)
            else:
                self.requests.pop(index, None)
        for source, target, direction in batch_update.moved:
            moving = self.requests.pop(source, None)
            if direction.name == "SWAP" and target in self.requests:
                self.requests[source] = self.requests.pop(target)
            else:
                self.requests.pop(target, None)
            if moving is not None:
                self.requests[target] = moving
        self.groups = None

    def _group(self, vocab_size):
        by_path = {}
        for index in sorted(self.requests):
            by_path.setdefault(self.requests[index].path, []).append(index)
        groups = []
        for path, indices in by_path.items():
            trie = _device_trie(path, vocab_size, self.device)
            removals = Removals(trie, len(indices))
            owner, leaves = [], []
            for i, index in enumerate(indices):
                owner += [i] * len(self.requests[index].removed)
                leaves += self.requests[index].removed
            if leaves:
                if max(leaves) >= trie.tree.n_leaves:
                    raise ValueError(f"{REMOVED_ARG}: leaf {max(leaves)} is not in the tree at {path}")
                removals.add(torch.tensor(owner, device=self.device),
                             torch.as_tensor(trie.tree.leaf_node[leaves], device=self.device))
            groups.append((trie, indices, removals))
        return groups

    def apply(self, logits):
        if not self.requests:
            return logits
        if self.groups is None:
            self.groups = self._group(logits.shape[1])
        for trie, indices, removals in self.groups:
            requests = [self.requests[index] for index in indices]
            new = [r.output[r.seen:] for r in requests]
            if any(PLACEHOLDER in tokens for tokens in new):
                raise RuntimeError("placeholder (-1) output tokens: pass the processor class to LLM(logits_processors="
                                   "...) or disable async scheduling")
            nodes = torch.tensor([r.node for r in requests], device=self.device)
            width = max(map(len, new))
            if width:
                padded = torch.tensor([t + [PLACEHOLDER] * (width - len(t)) for t in new], device=self.device)
                for step in range(width):
                    nodes = torch.where(padded[:, step] != PLACEHOLDER, trie.advance(nodes, padded[:, step]), nodes)
                for r, node, tokens in zip(requests, nodes.tolist(), new):
                    r.node, r.seen = node, r.seen + len(tokens)
            allowed = trie.allowed_mask(nodes, torch.arange(len(indices), device=self.device), removals)
            rows = torch.tensor(indices, device=logits.device)
            logits[rows] = logits[rows].masked_fill(~allowed.to(logits.device), float("-inf"))
        return logits


@functools.lru_cache(maxsize=None)
def processor_class():
    """The vLLM LogitsProcessor subclass (imports vLLM)."""
    from vllm.v1.sample.logits_processor import LogitsProcessor
    return type("TrieLogitsProcessorV1", (TrieBatchState, LogitsProcessor), {"__module__": __name__})


def __getattr__(name):
    # "vllm_trie:TrieLogitsProcessorV1" resolves here, importing vLLM only then.
    if name == "TrieLogitsProcessorV1":
        return processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
