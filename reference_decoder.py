"""Plain reference (oracle) for the prefix tree and the decoder: dicts, copies and one
`model.generate` call per DocID, written straight from the definitions in DESIGN.md section 5."""
import copy

import torch


def shortest_unique_paths(seqs, end):
    """{shortened path: sorted doc ids} from {doc id: token tuple (without the end token)}."""
    by_seq = {}
    for doc, seq in seqs.items():
        by_seq.setdefault(tuple(seq) + (end,), []).append(doc)

    def lcp(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    paths = {}
    for s, docs in by_seq.items():
        need = max((lcp(s, o) for o in by_seq if o != s), default=0) + 1
        path = s[:need] if s[need - 1] == end else s[:need] + (end,)
        paths[path] = sorted(docs)
    return paths


class DictTrie:
    """Nested-dict trie of shortened paths; `remove` prunes emptied ancestors (copy it per query)."""

    def __init__(self, paths, end):
        self.root, self.end = {}, end
        for path in paths:
            node = self.root
            for tok in path:
                node = node.setdefault(tok, {})

    def allowed(self, prefix):
        node = self.root
        for tok in prefix:
            if tok not in node:
                return [self.end]
            node = node[tok]
        return sorted(node) or [self.end]

    def remove(self, path):
        stack = [self.root]
        for tok in path:
            stack.append(stack[-1][tok])
        for depth in range(len(path) - 1, -1, -1):
            if stack[depth + 1]:
                break
            del stack[depth][path[depth]]

    def empty(self):
        return not self.root


def reference_decode(model, prompt, trie, temperatures, max_new_tokens, pad_id, top_k=None, top_p=None):
    """Iterative decoding of one query as in the original code: one generate call per DocID on a
    private copy of the trie, DocID i greedy when temperatures[i] == 0, else sampled at it."""
    trie = copy.deepcopy(trie)
    start = len(prompt)
    ids = torch.tensor([prompt])

    def allowed(_batch_id, row):
        return trie.allowed(row[start:].tolist())

    out = []
    for t in temperatures:
        if trie.empty():
            break
        sampling = dict(do_sample=True, temperature=float(t), top_k=top_k, top_p=top_p) if t > 0 else \
            dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), prefix_allowed_tokens_fn=allowed,
                             max_new_tokens=max_new_tokens, eos_token_id=trie.end, pad_token_id=pad_id, **sampling)
        path = tuple(gen[0, start:].tolist())
        out.append(path)
        trie.remove(path)
    return out
