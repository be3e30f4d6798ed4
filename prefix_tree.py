"""Prefix tree (trie) of DocIDs for constrained generative retrieval.

Every DocID is tokenized without special tokens, cut to MAX_DOCID_TOKENS tokens and followed by
the end token; each path is then shortened to its shortest unique prefix plus the end token (the
part shared with other DocIDs, one distinguishing token, end). Identical DocIDs share one leaf
that maps to all their documents. The result does not depend on the insertion order.

Storage is a set of flat integer arrays (no Python object per node), built level by level with
numpy and saved as .npy files that several processes can memory-map. Nodes are numbered by depth,
then by (parent, token), so node 0 is the root and the children of a node are consecutive:

    parent[M], token[M]        the edge into each node (-1 for the root)
    child_ptr[M+1]             children of node n: nodes child_ptr[n] .. child_ptr[n+1]-1
    edge_key[M]                parent * key_base + token, strictly increasing (-1 for the root),
                               so one searchsorted advances any batch of rows by one token
    leaf_count[M]              leaves below each node (a leaf counts itself)
    leaf_node[N]               node of each leaf, ascending (leaf ids follow node order)
    leaf_doc_ptr[N+1]          documents of leaf l: doc slots leaf_doc_ptr[l] .. leaf_doc_ptr[l+1]-1
    doc_id_ptr[D+1], doc_id_bytes   UTF-8 document ids, in slot order (sorted within a leaf)

`DeviceTrie` holds the same arrays as torch tensors on one device with the batched lookups the
decoder needs; `Removals` is the per-query overlay that removes decoded leaves without copying.
"""
import json
import logging
import os
import shutil
import tempfile
import warnings
from itertools import chain

import numpy as np
import torch

log = logging.getLogger("prefix_tree")

MAX_DOCID_TOKENS = 32   # DocID tokens kept before the end token; longer DocIDs are cut (and counted)
HOT_FANOUT = 1024       # nodes with this many children (and the root) get a dense allowed row on the device
TOKENIZE_CHUNK = 65536  # DocID texts per fast-tokenizer call
FORMAT_VERSION = 1
ARRAYS = {"parent": np.int32, "token": np.int32, "child_ptr": np.int64, "edge_key": np.int64,
          "leaf_count": np.int32, "leaf_node": np.int64, "leaf_doc_ptr": np.int64,
          "doc_id_ptr": np.int64, "doc_id_bytes": np.uint8}


def _names(doc_ids, index, limit=5):
    shown = ", ".join(repr(doc_ids[i]) for i in index[:limit])
    return shown + (f" and {len(index) - limit} more" if len(index) > limit else "")


def _rank_ids(id_array):
    """Rank of each document id in sorted order; a duplicate id is an error naming it."""
    order = np.argsort(id_array, kind="stable")
    sorted_ids = id_array[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if dup.size:
        raise ValueError(f"duplicate document id {sorted_ids[dup[0]]!r} ({dup.size} duplicate(s) in all)")
    rank = np.empty(len(id_array), np.int64)
    rank[order] = np.arange(len(id_array))
    return rank


class _Columns:
    """Column access to CSR DocIDs: token c of each DocID, the end token right after it, -1 past it.

    Reading columns from the flat token array means no (DocIDs x length) matrix is materialised."""

    def __init__(self, tokens, starts, kept, end_id):
        self.tokens, self.starts, self.kept, self.end_id = tokens, starts, kept, end_id
        self.width = int(kept.max()) + 1
        self.key_base = max(int(tokens.max()) if tokens.size else 0, end_id) + 1

    def __call__(self, rows, c):
        length = self.kept[rows]
        out = self.tokens[self.starts[rows] + np.minimum(c, length - 1)].astype(np.int64)
        out[c == length] = self.end_id
        out[c > length] = -1
        return out


def _lexsort(columns, doc_rank):
    """Order of the DocIDs sorted by token sequence, then by document id (several tokens per key)."""
    n = len(doc_rank)
    bits = columns.key_base.bit_length()
    per_word = 63 // bits
    everyone = np.arange(n)
    words = []
    for first in range(0, columns.width, per_word):
        word = np.zeros(n, np.int64)
        for c in range(first, min(first + per_word, columns.width)):
            word <<= bits
            word |= columns(everyone, c) + 1
        words.append(word)
    return np.lexsort([doc_rank] + words[::-1])  # the last key is the primary one


def _shortest_unique_prefixes(columns, perm):
    """First sorted row of each distinct sequence, and its kept length: one token past the
    longest prefix it shares with a sorted neighbour (that is, with any other sequence)."""
    width = columns.width
    first_diff = np.full(len(perm) - 1, width, np.int64)
    for c in range(width):
        col = columns(perm, c)
        first_diff[(first_diff == width) & (col[1:] != col[:-1])] = c
    rep = np.flatnonzero(np.concatenate([[True], first_diff < width]))
    shared = first_diff[rep[1:] - 1]
    need = np.zeros(rep.size, np.int64)
    need[1:] = shared
    need[:-1] = np.maximum(need[:-1], shared)
    return rep, need + 1


def _levels(columns, rep_doc, keep_len, path_len):
    """Breadth-first nodes of the shortened paths; sorted paths give non-decreasing
    (parent, token) keys at every depth, so new nodes are where the key changes."""
    parents, tokens, level_start = [np.array([-1])], [np.array([-1])], [0, 1]
    node_of_path = np.zeros(len(rep_doc), np.int64)
    n_nodes = 1
    for depth in range(int(path_len.max())):
        idx = np.flatnonzero(path_len > depth)
        tok = np.where(depth < keep_len[idx], columns(rep_doc[idx], depth), columns.end_id)
        key = node_of_path[idx] * columns.key_base + tok
        new = np.empty(idx.size, bool)
        new[0] = True
        np.not_equal(key[1:], key[:-1], out=new[1:])
        parents.append(node_of_path[idx][new].astype(np.int32))
        tokens.append(tok[new].astype(np.int32))
        node_of_path[idx] = n_nodes + np.cumsum(new) - 1
        n_nodes += int(new.sum())
        level_start.append(n_nodes)
    return np.concatenate(parents), np.concatenate(tokens), node_of_path, level_start


def _leaf_counts(parent, leaf_node, level_start):
    """Leaves below each node, summed from the deepest level up."""
    count = np.zeros(len(parent), np.int64)
    count[leaf_node] = 1
    for d in range(len(level_start) - 2, 0, -1):
        s, e, ps = level_start[d], level_start[d + 1], level_start[d - 1]
        count[ps:s] += np.bincount(parent[s:e] - ps, weights=count[s:e], minlength=s - ps).astype(np.int64)
    return count


def _pack_strings(strings):
    """(ptr, UTF-8 bytes) of a sequence of strings, joined through one encode call."""
    data = np.frombuffer("\x00".join(strings).encode("utf-8"), np.uint8)
    sep = np.flatnonzero(data == 0)
    if sep.size != len(strings) - 1:
        raise ValueError("document ids must not contain NUL characters")
    ptr = np.concatenate([[0], sep + 1, [data.size + 1]])
    ptr -= np.arange(len(strings) + 1)  # each string starts after the separators before it
    return ptr, np.delete(data, sep)


class PrefixTree:
    """Static DocID trie in flat arrays; build with `build`, `from_token_ids` or `load`."""

    def __init__(self, arrays, meta):
        for name in ARRAYS:
            setattr(self, name, arrays[name])
        self.end_id = int(meta["end_id"])
        self.key_base = int(meta["key_base"])
        self.max_depth = int(meta["max_depth"])
        self.stats = dict(meta.get("stats", {}))

    # ----- building -----

    @classmethod
    def build(cls, pairs, tokenizer, end_id=None, max_tokens=MAX_DOCID_TOKENS, skip_empty=False):
        """Trie of `(doc_id, docid_text)` pairs; the end token defaults to `tokenizer.eos_token_id`."""
        end_id = tokenizer.eos_token_id if end_id is None else end_id
        if end_id is None:
            raise ValueError("the tokenizer has no eos token: pass end_id (the token that ends a DocID)")
        doc_ids, texts = [], []
        for doc_id, text in pairs:
            doc_ids.append(doc_id)
            texts.append(text)
        token_lists = []
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            token_lists.extend(tokenizer(texts[start:start + TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"])
        return cls.from_token_ids(zip(doc_ids, token_lists), end_id, max_tokens, skip_empty)

    @classmethod
    def from_token_ids(cls, pairs, end_id, max_tokens=MAX_DOCID_TOKENS, skip_empty=False):
        """Trie of `(doc_id, token_ids)` pairs (token ids without the end token)."""
        doc_ids, seqs = [], []
        for doc_id, seq in pairs:
            doc_ids.append(doc_id)
            seqs.append(seq)
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        tokens = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
        return cls.from_arrays(doc_ids, tokens, lengths, end_id, max_tokens, skip_empty)

    @classmethod
    def from_arrays(cls, doc_ids, tokens, lengths, end_id, max_tokens=MAX_DOCID_TOKENS, skip_empty=False):
        """Trie of DocIDs given as CSR token arrays: DocID i is tokens[sum(lengths[:i]):][:lengths[i]]."""
        if end_id is None:
            raise ValueError("end_id is required (the token that ends every DocID)")
        end_id = int(end_id)
        doc_ids = list(map(str, doc_ids))
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        n = len(doc_ids)
        if n == 0:
            raise ValueError("no DocIDs to build a prefix tree from")
        if lengths.shape != (n,) or int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths must give one length per document ({n}) and sum to the number of tokens")
        starts = np.cumsum(lengths) - lengths
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 31 - 1):
            bad = np.flatnonzero((tokens < 0) | (tokens >= 2 ** 31 - 1))
            owners = np.searchsorted(starts, bad, "right") - 1
            raise ValueError(f"token ids out of range in the DocID of {_names(doc_ids, np.unique(owners))}")
        with_end = np.flatnonzero(tokens == end_id)
        if with_end.size:
            raise ValueError(f"the end token {end_id} occurs inside the DocID of "
                             f"{_names(doc_ids, np.unique(np.searchsorted(starts, with_end, 'right') - 1))}")
        stats = {"docs_in": n, "cut": 0, "skipped_empty": 0}
        empty = np.flatnonzero(lengths == 0)
        if empty.size:
            if not skip_empty:
                raise ValueError(f"{empty.size} empty DocID(s): {_names(doc_ids, empty)}")
            log.warning("skipped %d documents with an empty DocID: %s", empty.size, _names(doc_ids, empty))
            keep = np.flatnonzero(lengths > 0)
            doc_ids = [doc_ids[i] for i in keep]
            starts, lengths, n = starts[keep], lengths[keep], keep.size
            stats["skipped_empty"] = int(empty.size)
            if n == 0:
                raise ValueError("every DocID is empty")
        id_array = np.array(doc_ids, dtype=object)
        del doc_ids
        doc_rank = _rank_ids(id_array)
        cut = lengths > max_tokens
        stats["cut"] = int(cut.sum())
        if stats["cut"]:
            log.warning("%d DocIDs longer than %d tokens were cut to that length (e.g. %s)",
                        stats["cut"], max_tokens, _names(id_array, np.flatnonzero(cut), 3))
        columns = _Columns(tokens, starts, np.minimum(lengths, max_tokens), end_id)
        perm = _lexsort(columns, doc_rank)
        del doc_rank
        rep, keep_len = _shortest_unique_prefixes(columns, perm)
        rep_doc = perm[rep]
        add_end = columns(rep_doc, keep_len - 1) != end_id
        parent, token, node_of_path, level_start = _levels(columns, rep_doc, keep_len, keep_len + add_end)
        del rep_doc, add_end, keep_len
        n_nodes, n_paths = len(parent), len(rep)
        edge_key = parent.astype(np.int64) * columns.key_base + token
        edge_key[0] = -1
        assert np.all(edge_key[1:] > edge_key[:-1]), "edge keys must be strictly increasing"
        leaf_order = np.argsort(node_of_path)
        leaf_node = node_of_path[leaf_order]
        del node_of_path
        # Documents of a leaf: the rows of its group in the sorted order (already sorted by id).
        sizes = np.diff(np.append(rep, n))[leaf_order]
        leaf_doc_ptr = np.concatenate([[0], np.cumsum(sizes)])
        slot_doc = perm[np.repeat(rep[leaf_order] - leaf_doc_ptr[:-1], sizes) + np.arange(n)]
        del perm, rep, leaf_order, sizes
        doc_id_ptr, doc_id_bytes = _pack_strings(id_array[slot_doc])
        stats.update(docs=n, leaves=n_paths, nodes=n_nodes)
        child_ptr = np.searchsorted(parent[1:], np.arange(n_nodes + 1)) + 1  # parents are sorted
        arrays = {"parent": parent, "token": token, "child_ptr": child_ptr, "edge_key": edge_key,
                  "leaf_count": _leaf_counts(parent, leaf_node, level_start), "leaf_node": leaf_node,
                  "leaf_doc_ptr": leaf_doc_ptr, "doc_id_ptr": doc_id_ptr, "doc_id_bytes": doc_id_bytes}
        arrays = {name: np.ascontiguousarray(x, dtype=ARRAYS[name]) for name, x in arrays.items()}
        max_depth = len(level_start) - 2
        log.info("prefix tree: %d documents, %d leaves, %d nodes, depth %d", n, n_paths, n_nodes, max_depth)
        return cls(arrays, {"end_id": end_id, "key_base": columns.key_base, "max_depth": max_depth, "stats": stats})

    # ----- queries -----

    @property
    def n_nodes(self):
        return len(self.parent)

    @property
    def n_leaves(self):
        return len(self.leaf_node)

    @property
    def doc_count(self):
        return len(self.doc_id_ptr) - 1

    @property
    def nbytes(self):
        return sum(getattr(self, name).nbytes for name in ARRAYS)

    def leaf_docs(self, leaf):
        """Document ids on a leaf, sorted."""
        ptr, blob = self.doc_id_ptr, self.doc_id_bytes
        s, e = int(self.leaf_doc_ptr[leaf]), int(self.leaf_doc_ptr[leaf + 1])
        return [bytes(blob[ptr[i]:ptr[i + 1]]).decode("utf-8") for i in range(s, e)]

    def leaf_tokens(self, leaf):
        """The stored (shortened) path of a leaf, end token included."""
        node, out = int(self.leaf_node[leaf]), []
        while node > 0:
            out.append(int(self.token[node]))
            node = int(self.parent[node])
        return out[::-1]

    def leaf_of_node(self, node):
        """Leaf id of a node, or -1 when the node is not a leaf."""
        i = int(np.searchsorted(self.leaf_node, node))
        return i if i < self.n_leaves and self.leaf_node[i] == node else -1

    def node_of(self, prefix):
        """Node reached by a token prefix from the root, or -1 when it leaves the tree."""
        node = 0
        for tok in prefix:
            if not 0 <= tok < self.key_base:
                return -1
            key = node * self.key_base + int(tok)
            i = int(np.searchsorted(self.edge_key, key))
            if i >= self.n_nodes or self.edge_key[i] != key:
                return -1
            node = i
        return node

    def next_tokens(self, prefix):
        """Allowed next tokens after a prefix: the node's children, else only the end token."""
        node = self.node_of(prefix)
        if node < 0 or self.child_ptr[node] == self.child_ptr[node + 1]:
            return [self.end_id]
        return self.token[self.child_ptr[node]:self.child_ptr[node + 1]].tolist()

    def to_device(self, vocab_size, device="cpu"):
        return DeviceTrie(self, vocab_size, device)

    # ----- storage -----

    def save(self, path):
        """Write one .npy file per array and meta.json into directory `path` (replaced whole)."""
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
        try:
            for name in ARRAYS:
                np.save(os.path.join(tmp, name + ".npy"), getattr(self, name))
            meta = {"format": FORMAT_VERSION, "end_id": self.end_id, "key_base": self.key_base,
                    "max_depth": self.max_depth, "stats": self.stats}
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path, mmap=True):
        """Load a saved tree; with mmap the arrays are read-only memory maps shared between processes."""
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: prefix tree format {meta.get('format')}, expected {FORMAT_VERSION}")
        arrays = {name: np.load(os.path.join(path, name + ".npy"), mmap_mode="r" if mmap else None) for name in ARRAYS}
        return cls(arrays, meta)


def _to_torch(array, device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memory maps are never written through
        return torch.from_numpy(np.asarray(array)).to(device)


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
        for name in ("parent", "token", "child_ptr", "edge_key", "leaf_count", "leaf_node"):
            setattr(self, name, _to_torch(getattr(tree, name), self.device))
        # Nodes are numbered level by level: level d + 1 holds the children of level d.
        level_start = [0, 1]
        while level_start[-1] > level_start[-2]:
            level_start.append(int(tree.child_ptr[level_start[-1]]))
        self.level_start = torch.as_tensor(level_start[:-1], dtype=torch.long, device=self.device)
        fanout = np.diff(tree.child_ptr)
        hot = np.union1d([0], np.flatnonzero(fanout >= HOT_FANOUT))
        self.hot_nodes = torch.as_tensor(hot, dtype=torch.long, device=self.device)
        rows = np.repeat(np.arange(hot.size), fanout[hot])
        cols = np.concatenate([tree.token[tree.child_ptr[h]:tree.child_ptr[h + 1]] for h in hot])
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
        return torch.where(nodes >= 0, self.child_ptr[safe + 1] - self.child_ptr[safe], 0)

    def end_child(self, nodes):
        """The end-token child of each node whose only child it is (a complete DocID), else -1."""
        safe = nodes.clamp(min=0)
        first = self.child_ptr[safe]
        only_end = (self.fanout(nodes) == 1) & (self.token[first.clamp(max=self.n_nodes - 1)] == self.end_id)
        return torch.where(only_end, first, -1)

    def is_leaf(self, nodes):
        return (nodes >= 0) & (self.fanout(nodes) == 0)

    def leaf_index(self, nodes):
        """Leaf id of each leaf node (undefined for other nodes)."""
        return torch.searchsorted(self.leaf_node, nodes.clamp(min=0)).clamp(max=len(self.leaf_node) - 1)

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
        tokens = self.token[child].long()
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
        cur = leaf_nodes
        for _ in range(int(self.depth(leaf_nodes).max()) + 1):
            keep = cur >= 0
            rows.append(index[keep])
            nodes.append(cur[keep])
            cur = torch.where(keep, self.parent[cur.clamp(min=0)].long(), -1)
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
        touched, count = torch.unique(queries[rows] * m + nodes, return_counts=True)
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
        dead = count >= self.trie.leaf_count[node].long()
        query, node = touched[dead] // m, node[dead]
        self.exhausted[query[node == 0]] = True
        parent = self.trie.parent[node].long()
        hot = self.trie.hot_index(parent)[1]
        self.hot_query = torch.cat([self.hot_query, query[hot]])
        self.hot_parent = torch.cat([self.hot_parent, parent[hot]])
        self.hot_token = torch.cat([self.hot_token, self.trie.token[node[hot]].long()])

    def is_dead(self, queries, nodes):
        """Bool per entry: every leaf below the node is removed for that query."""
        if self.keys.numel() == 0:
            return torch.zeros_like(nodes, dtype=torch.bool)
        key = queries * self.trie.n_nodes + nodes.clamp(min=0)
        pos = torch.searchsorted(self.keys, key).clamp(max=self.keys.numel() - 1)
        count = torch.where(self.keys[pos] == key, self.counts[pos], 0)
        return (nodes >= 0) & (count >= self.trie.leaf_count[nodes.clamp(min=0)].long())


def _rows_of(row_query, queries):
    """(row, entry) for every entry of `queries` and every row whose query it is."""
    order = torch.argsort(row_query, stable=True)
    sorted_q = row_query[order]
    lo = torch.searchsorted(sorted_q, queries)
    count = torch.searchsorted(sorted_q, queries, right=True) - lo
    entry = torch.repeat_interleave(torch.arange(len(count), device=count.device), count)
    offset = torch.arange(entry.numel(), device=count.device) - torch.repeat_interleave(count.cumsum(0) - count, count)
    return order[lo[entry] + offset], entry
