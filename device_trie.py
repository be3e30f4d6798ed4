"""A PrefixTree's arrays as torch tensors on one device, with the batched lookups the decoder
needs (`DeviceTrie`), the per-query overlay that removes decoded leaves without copying the tree
(`Removals`), and the decoder's per-node candidate lists (`_RootCandidates`, `_live_candidates`).
On the CPU the tensors share the tree's numpy arrays (memory maps included)."""
import warnings

import numpy as np
import torch

HOT_FANOUT = 1024  # nodes with this many children (and the root) get a dense allowed row on the device


def _to_torch(array, device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memory maps are never written through
        return torch.from_numpy(np.asarray(array)).to(device)


class _EdgePart:
    """`trie.token[nodes]` or `trie.parent[nodes]`: read from edge_key on indexing, no array of
    their own (-1 for the root)."""

    def __init__(self, trie, part):
        self.trie, self.part = trie, part

    def __getitem__(self, nodes):
        key = self.trie.edge_key[nodes]
        if self.part == "parent":
            return torch.div(key, self.trie.key_base, rounding_mode="floor")
        return torch.where(key >= 0, key % self.trie.key_base, -1)


class DeviceTrie:
    """A PrefixTree's arrays as torch tensors on one device, with batched (per-row) lookups."""

    def __init__(self, tree, vocab_size, device="cpu"):
        if tree.key_base > vocab_size:
            raise ValueError(f"the prefix tree uses token ids up to {tree.key_base - 1}, "
                             f"beyond the model's vocabulary of {vocab_size}")
        self.tree, self.vocab_size = tree, vocab_size
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", comparable to model.device
        self.end_id, self.key_base, self.max_depth = tree.end_id, tree.key_base, tree.max_depth
        self.n_nodes = tree.n_nodes
        for name in ("edge_key", "child_ptr", "leaf_count", "leaf_node"):
            setattr(self, name, _to_torch(getattr(tree, name), self.device))
        self.token, self.parent = _EdgePart(self, "token"), _EdgePart(self, "parent")
        # Nodes are numbered level by level: level d + 1 holds the children of level d.
        level_start = [0, 1]
        while level_start[-1] > level_start[-2]:
            level_start.append(int(tree.child_ptr[level_start[-1]]))
        self.level_start = torch.as_tensor(level_start[:-1], dtype=torch.long, device=self.device)
        fanout = np.diff(tree.child_ptr)
        hot = np.union1d([0], np.flatnonzero(fanout >= HOT_FANOUT))
        self.hot_nodes = torch.as_tensor(hot, dtype=torch.long, device=self.device)
        rows = np.repeat(np.arange(hot.size), fanout[hot])
        cols = np.concatenate([tree.edge_key[tree.child_ptr[h]:tree.child_ptr[h + 1]] % tree.key_base for h in hot])
        # Dense rows of the hot nodes, then an empty row for every other node; the extra column
        # takes the writes that must not land (see allowed_mask).
        self.dense = torch.zeros(hot.size + 1, vocab_size + 1, dtype=torch.bool, device=self.device)
        self.dense[torch.as_tensor(rows, device=self.device),
                   torch.as_tensor(cols, dtype=torch.long, device=self.device)] = True

    def advance(self, nodes, tokens):
        """Child of each node along each token; -1 where the row is or goes off the tree."""
        ok = (nodes >= 0) & (tokens >= 0) & (tokens < self.key_base)
        key = nodes.clamp(min=0) * self.key_base + tokens.clamp(0, self.key_base - 1)
        pos = torch.searchsorted(self.edge_key, key).clamp(max=self.n_nodes - 1)
        return torch.where(ok & (self.edge_key[pos] == key), pos, -1)

    def walk(self, suffix):
        """Node reached by each row of a (rows, steps) token matrix, starting at the root."""
        nodes = torch.zeros(suffix.shape[0], dtype=torch.long, device=suffix.device)
        for step in range(suffix.shape[1]):
            nodes = self.advance(nodes, suffix[:, step])
        return nodes

    def fanout(self, nodes):
        safe = nodes.clamp(min=0)
        return torch.where(nodes >= 0, self.child_ptr[safe + 1] - self.child_ptr[safe], 0).long()

    def end_child(self, nodes):
        """The end-token child of each node whose only child it is (a complete DocID), else -1."""
        first = self.child_ptr[nodes.clamp(min=0)].long()
        only_end = (self.fanout(nodes) == 1) & (self.token[first.clamp(max=self.n_nodes - 1)] == self.end_id)
        return torch.where(only_end, first, -1)

    def is_leaf(self, nodes):
        return (nodes >= 0) & (self.fanout(nodes) == 0)

    def leaf_index(self, nodes):
        """Leaf id of each leaf node (undefined for other nodes)."""
        pos = torch.searchsorted(self.leaf_node, nodes.clamp(min=0).to(self.leaf_node.dtype))
        return pos.clamp(max=len(self.leaf_node) - 1)

    def children(self, nodes, include=None):
        """(row, child node) pairs for all children of each row's node (rows where include is False skipped)."""
        count = self.fanout(nodes)
        if include is not None:
            count = torch.where(include, count, 0)
        rows = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), count)
        first = torch.repeat_interleave(count.cumsum(0) - count, count)
        offset = torch.arange(rows.numel(), device=nodes.device) - first
        return rows, self.child_ptr[nodes.clamp(min=0)][rows] + offset

    def hot_index(self, nodes):
        """(dense row, is hot) of each node: hot nodes have a dense allowed-token row."""
        pos = torch.searchsorted(self.hot_nodes, nodes.clamp(min=0)).clamp(max=len(self.hot_nodes) - 1)
        return pos, (nodes >= 0) & (self.hot_nodes[pos] == nodes)

    def allowed_mask(self, nodes, row_query=None, removals=None):
        """(rows, vocab) bool mask of each row's allowed next tokens.

        A row at a node with live children may take exactly those; a row off the tree, at a leaf, or
        whose query has exhausted the tree may only take the end token. With `removals`, children
        dead for a row's query (`row_query`) are masked.
        """
        if removals is not None and row_query is None:
            raise ValueError("row_query (the query of each row) is required with removals")
        n_rows, vocab = nodes.shape[0], self.vocab_size
        pos, hot = self.hot_index(nodes)
        allowed = self.dense[torch.where(hot, pos, len(self.hot_nodes))]  # (rows, vocab + 1)
        rows, child = self.children(nodes, ~hot)
        tokens = self.token[child]
        if removals is not None:
            tokens = torch.where(removals.is_dead(row_query[rows], child), vocab, tokens)
        allowed[rows, tokens] = True
        if removals is not None and removals.hot_query.numel():
            rows, entry = _rows_of(row_query, removals.hot_query)
            hit = nodes[rows] == removals.hot_parent[entry]
            allowed[rows, torch.where(hit, removals.hot_token[entry], vocab)] = False
        allowed[:, vocab] = False
        none = ~allowed.any(1)
        allowed[torch.arange(n_rows, device=nodes.device), torch.where(none, self.end_id, vocab)] = True
        return allowed[:, :vocab]

    def depth(self, nodes):
        return torch.searchsorted(self.level_start, nodes, right=True) - 1

    def path_nodes(self, leaf_nodes):
        """(row, node) pairs of every node on each leaf's path, root included."""
        rows, nodes = [], []
        index = torch.arange(len(leaf_nodes), device=leaf_nodes.device)
        cur = leaf_nodes.long()
        for _ in range(int(self.depth(cur).max()) + 1):
            keep = cur >= 0
            rows.append(index[keep])
            nodes.append(cur[keep])
            cur = torch.where(keep, self.parent[cur.clamp(min=0)], -1)
        return torch.cat(rows), torch.cat(nodes)


class Removals:
    """Per-query removed leaves over a shared DeviceTrie: sampling without replacement, no copies.

    For each (query, node) touched by a removed leaf it keeps how many removed leaves lie below
    the node (sorted keys query * n_nodes + node). A node is dead for a query once that count
    reaches the node's static leaf_count: its subtree is exhausted, so a query can never walk into
    a dead end nor decode a leaf twice. Dead children of hot nodes (served from dense rows) are
    also listed pair by pair.
    """

    def __init__(self, trie, n_queries):
        self.trie, self.n_queries = trie, n_queries
        empty = torch.zeros(0, dtype=torch.long, device=trie.device)
        self.keys, self.counts = empty, empty
        self.hot_query, self.hot_parent, self.hot_token = empty, empty, empty
        self.exhausted = torch.zeros(n_queries, dtype=torch.bool, device=trie.device)

    def add(self, queries, leaf_nodes):
        """Remove one leaf per entry (each (query, leaf) at most once overall)."""
        if leaf_nodes.numel() == 0:
            return
        m = self.trie.n_nodes
        rows, nodes = self.trie.path_nodes(leaf_nodes)
        touched, count = torch.unique(queries.long()[rows] * m + nodes, return_counts=True)
        if self.keys.numel():
            pos = torch.searchsorted(self.keys, touched).clamp(max=self.keys.numel() - 1)
            seen = self.keys[pos] == touched
            count = count + torch.where(seen, self.counts[pos], 0)
            self.counts[pos[seen]] = count[seen]
        else:
            seen = torch.zeros_like(touched, dtype=torch.bool)
        self.keys, order = torch.sort(torch.cat([self.keys, touched[~seen]]))
        self.counts = torch.cat([self.counts, count[~seen]])[order]
        # Every touched node was alive (its new leaf was), so the dead ones just died.
        node = touched % m
        dead = count >= self.trie.leaf_count[node]
        query, node = touched[dead] // m, node[dead]
        self.exhausted[query[node == 0]] = True
        parent = self.trie.parent[node]
        hot = self.trie.hot_index(parent)[1]
        self.hot_query = torch.cat([self.hot_query, query[hot]])
        self.hot_parent = torch.cat([self.hot_parent, parent[hot]])
        self.hot_token = torch.cat([self.hot_token, self.trie.token[node[hot]]])

    def is_dead(self, queries, nodes):
        """Bool per entry: every leaf below the node is removed for that query."""
        if self.keys.numel() == 0:
            return torch.zeros_like(nodes, dtype=torch.bool)
        key = queries * self.trie.n_nodes + nodes.clamp(min=0)
        pos = torch.searchsorted(self.keys, key).clamp(max=self.keys.numel() - 1)
        count = torch.where(self.keys[pos] == key, self.counts[pos], 0)
        return (nodes >= 0) & (count >= self.trie.leaf_count[nodes.clamp(min=0)])


class _RootCandidates:
    """Each row's root children ordered by its prompt logits, best first, computed once per batch:
    a draw at the root takes the first live ones instead of scanning the vocabulary. Each draw
    kills at most one root child, so `depth` = top-k + draws always leaves top-k live ones."""

    def __init__(self, trie, first_logits, depth=None):
        start, end = int(trie.child_ptr[0]), int(trie.child_ptr[1])
        tokens = trie.token[start:end]
        depth = end - start if depth is None else min(depth, end - start)
        self.values, order = first_logits[:, tokens].topk(depth, dim=1)
        self.children = order + start


def _live_candidates(trie, removals, roots, logits, rows, queries, nodes, width=None):
    """(values, children): for each row, the live children of its node (for its query) and their
    logits, best first, at most `width` (None: all), padded with -inf / -1. Rows at the root use
    `roots`; the others gather their logits at their children only."""
    n, device, neg_inf = len(rows), logits.device, float("-inf")
    at_root = nodes == 0
    parts = []
    r = torch.nonzero(at_root).squeeze(1)
    if r.numel():
        child = roots.children[rows[r]]
        live = ~removals.is_dead(queries[r, None].expand_as(child), child)
        w = child.shape[1] if width is None else min(width, child.shape[1])
        rank = live.cumsum(1) - 1
        col = torch.where(live & (rank < w), rank, w)  # the extra column takes the dropped ones
        values = torch.full((len(r), w + 1), neg_inf, device=device).scatter_(1, col, roots.values[rows[r]])
        children = torch.full((len(r), w + 1), -1, device=device).scatter_(1, col, child)
        parts.append((r, values[:, :w], children[:, :w]))
    o = torch.nonzero(~at_root).squeeze(1)
    if o.numel():
        row, child = trie.children(nodes[o])
        live = ~removals.is_dead(queries[o][row], child)
        row, child = row[live], child[live]
        count = torch.bincount(row, minlength=len(o))
        w = int(count.max())
        offset = torch.arange(len(row), device=device) - (count.cumsum(0) - count)[row]
        values = torch.full((len(o), w), neg_inf, device=device)
        values[row, offset] = logits[rows[o][row], trie.token[child]]
        children = torch.full((len(o), w), -1, device=device)
        children[row, offset] = child
        values, order = values.topk(w if width is None else min(width, w), dim=1)
        parts.append((o, values, children.gather(1, order)))
    w = max(1, *(part[1].shape[1] for part in parts))  # a row without live children keeps one -inf
    out_values = torch.full((n, w), neg_inf, device=device)
    out_children = torch.full((n, w), -1, dtype=torch.long, device=device)
    for index, values, children in parts:
        out_values[index, :values.shape[1]] = values
        out_children[index, :children.shape[1]] = children
    return out_values, out_children


def _rows_of(row_query, queries):
    """(row, entry) for every entry of `queries` and every row whose query it is."""
    order = torch.argsort(row_query, stable=True)
    sorted_q = row_query[order]
    lo = torch.searchsorted(sorted_q, queries)
    count = torch.searchsorted(sorted_q, queries, right=True) - lo
    entry = torch.repeat_interleave(torch.arange(len(count), device=count.device), count)
    offset = torch.arange(entry.numel(), device=count.device) - torch.repeat_interleave(count.cumsum(0) - count, count)
    return order[lo[entry] + offset], entry
