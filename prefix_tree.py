"""Prefix tree (trie) of DocIDs for constrained generative retrieval.

Every DocID is tokenized without special tokens, cut to MAX_DOCID_TOKENS tokens and followed by
the end token; each path is then shortened to its shortest unique prefix plus the end token (the
part shared with other DocIDs, one distinguishing token, end). Identical DocIDs share one leaf
that maps to all their documents. The result does not depend on the insertion order.

Storage is a set of flat integer arrays (no Python object per node), built level by level with
numpy and saved as .npy files that several processes can memory-map. Nodes are numbered by depth,
then by (parent, token), so node 0 is the root and the children of a node are consecutive:

    edge_key[M]                parent * key_base + token of the edge into each node (-1 for the
                               root), strictly increasing: one searchsorted advances any batch of
                               rows by one token, and parent and token are its quotient and remainder
    child_ptr[M+1]             children of node n: nodes child_ptr[n] .. child_ptr[n+1]-1
    leaf_count[M]              leaves below each node (a leaf counts itself)
    leaf_node[N]               node of each leaf, ascending (leaf ids follow node order)
    leaf_doc_ptr[N+1]          documents of leaf l: doc slots leaf_doc_ptr[l] .. leaf_doc_ptr[l+1]-1
    doc_id_ptr[D+1], doc_id_bytes   UTF-8 document ids, in slot order (sorted within a leaf)

Index arrays are int32 while their values fit, int64 beyond. `device_trie.DeviceTrie` serves the
same arrays as torch tensors to the decoder.
"""
import json
import logging
import os
import shutil
import tempfile
from itertools import chain

import numpy as np

from file_io import umask_mode

log = logging.getLogger("prefix_tree")

MAX_DOCID_TOKENS = 32   # DocID tokens kept before the end token; longer DocIDs are cut (and counted)
TOKENIZE_CHUNK = 65536  # DocID texts per fast-tokenizer call
CHUNK = 1 << 20         # rows per vectorised step where work can be split (bounds temporary memory)
FORMAT_VERSION = 2      # format 1 (int64 indices, parent and token arrays besides) still loads
ARRAYS = ("edge_key", "child_ptr", "leaf_count", "leaf_node", "leaf_doc_ptr", "doc_id_ptr", "doc_id_bytes")


def _index_dtype(largest):
    """int32 when every value up to `largest` fits, else int64."""
    return np.int32 if largest < 2 ** 31 else np.int64


def _names(doc_ids, index, limit=5):
    shown = ", ".join(repr(doc_ids[i]) for i in index[:limit])
    return shown + (f" and {len(index) - limit} more" if len(index) > limit else "")


def _check_unique(ids):
    """A duplicate document id is an error naming it; hashes find the candidates to compare."""
    hashes = np.fromiter(map(hash, ids), np.int64, count=len(ids))
    ordered = np.sort(hashes)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    del ordered
    if repeated.size:
        candidates = np.sort(ids[np.isin(hashes, repeated)])
        dup = np.flatnonzero(candidates[1:] == candidates[:-1])
        if dup.size:
            raise ValueError(f"duplicate document id {candidates[dup[0]]!r} ({dup.size} duplicate(s) in all)")


def _csr(seqs):
    """(flat tokens, lengths) of a list of token-id sequences."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    return np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum())), lengths


class _Columns:
    """Column access to CSR DocIDs: token c of each DocID, the end token right after it, -1 past it.

    Reading columns from the flat token array means no (DocIDs x length) matrix is materialised."""

    def __init__(self, tokens, starts, kept, end_id):
        self.tokens, self.starts, self.kept, self.end_id = tokens, starts, kept, end_id
        self.width = int(kept.max()) + 1
        self.key_base = max(int(tokens.max()) if tokens.size else 0, end_id) + 1

    def __call__(self, rows, c):
        length = self.kept[rows]
        out = self.tokens[self.starts[rows] + np.minimum(c, length - 1)].astype(np.int32, copy=False)
        out[c == length] = self.end_id
        out[c > length] = -1
        return out


def _checked_columns(doc_ids, tokens, lengths, end_id, max_tokens, skip_empty):
    """(ids, _Columns cut to max_tokens, stats) of CSR DocIDs; a malformed DocID is a ValueError naming it."""
    if end_id is None:
        raise ValueError("end_id is required (the token that ends every DocID)")
    end_id = int(end_id)
    ids = np.fromiter(map(str, doc_ids), dtype=object)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
    n = len(ids)
    if n == 0:
        raise ValueError("no DocIDs to build a prefix tree from")
    if lengths.shape != (n,) or int(lengths.sum()) != tokens.size:
        raise ValueError(f"lengths must give one length per document ({n}) and sum to the number of tokens")
    starts = np.cumsum(lengths, dtype=_index_dtype(tokens.size))
    starts -= lengths
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 31 - 1):
        bad = np.flatnonzero((tokens < 0) | (tokens >= 2 ** 31 - 1))
        owners = np.searchsorted(starts, bad, "right") - 1
        raise ValueError(f"token ids out of range in the DocID of {_names(ids, np.unique(owners))}")
    with_end = np.flatnonzero(tokens == end_id)
    if with_end.size:
        raise ValueError(f"the end token {end_id} occurs inside the DocID of "
                         f"{_names(ids, np.unique(np.searchsorted(starts, with_end, 'right') - 1))}")
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        if not skip_empty:
            raise ValueError(f"{empty.size} empty DocID(s): {_names(ids, empty)}")
        log.warning("skipped %d documents with an empty DocID: %s", empty.size, _names(ids, empty))
        keep = np.flatnonzero(lengths > 0)
        ids, starts, lengths = ids[keep], starts[keep], lengths[keep]
        if keep.size == 0:
            raise ValueError("every DocID is empty")
    _check_unique(ids)
    cut = lengths > max_tokens
    stats = {"docs_in": n, "cut": int(cut.sum()), "skipped_empty": int(empty.size)}
    if stats["cut"]:
        log.warning("%d DocIDs longer than %d tokens were cut to that length (e.g. %s)",
                    stats["cut"], max_tokens, _names(ids, np.flatnonzero(cut), 3))
    return ids, _Columns(tokens, starts, np.minimum(lengths, max_tokens).astype(np.int32), end_id), stats


def _stable_order(key, largest):
    """np.argsort(key, kind="stable"); keys below 2**16 take numpy's radix sort."""
    return np.argsort(key.astype(np.uint16) if largest < 2 ** 16 else key, kind="stable")


def _sort_rows(columns, n):
    """Rows sorted by token sequence (end token included), ties in row order, and first_diff[j]:
    the first column where sorted rows j and j + 1 differ (columns.width when identical).

    Column by column, only groups of rows that share their prefix so far are re-sorted, so most
    rows drop out after a few columns."""
    index = _index_dtype(n)
    perm = np.arange(n, dtype=index)
    first_diff = np.full(n - 1, columns.width, np.min_scalar_type(columns.width))
    pos, group = perm.copy(), np.zeros(n, index)  # positions still shared, and their group
    for c in range(columns.width):
        if pos.size == 0:
            break
        rows = perm[pos]
        col = columns(rows, c)
        key = group.astype(np.int64)
        key *= columns.key_base
        key += col
        order = _stable_order(key, (int(group[-1]) + 1) * columns.key_base)
        del key
        col = col[order]
        perm[pos] = rows[order]  # the group of each position stays: it is the primary key
        del rows, order
        new = np.empty(pos.size, bool)
        new[0] = True
        np.not_equal(col[1:], col[:-1], out=new[1:])
        same_group = group[1:] == group[:-1]
        first_diff[pos[1:][new[1:] & same_group] - 1] = c
        new[1:] |= ~same_group
        del same_group
        group = np.cumsum(new, dtype=index)
        shared = np.bincount(group)[group] > 1
        shared &= col != columns.end_id
        pos, group = pos[shared], group[shared]
    return perm, first_diff


def _order_ties_by_id(perm, first_diff, width, ids):
    """Sort each run of identical sequences in `perm` by document id, in place."""
    same = first_diff == width
    if not same.any():
        return
    member = np.zeros(len(perm), bool)
    member[:-1] = same
    member[1:] |= same
    pos = np.flatnonzero(member)
    starts = np.ones(pos.size, bool)
    starts[1:] = ~same[pos[1:] - 1]
    group = np.cumsum(starts)
    by_id = np.argsort(ids[perm[pos]], kind="stable")
    perm[pos] = perm[pos][by_id[np.argsort(group[by_id], kind="stable")]]


def _unique_prefix_lengths(first_diff, width):
    """First sorted row of each distinct sequence, its kept length (one token past the longest
    prefix it shares with a sorted neighbour, that is with any other sequence), and the prefix
    lengths shared by consecutive distinct sequences."""
    distinct = first_diff < width
    rep = np.flatnonzero(np.concatenate([[True], distinct])).astype(_index_dtype(len(first_diff)))
    shared = first_diff[distinct].astype(np.int32)
    keep_len = np.zeros(rep.size, np.int32)
    keep_len[1:] = shared
    np.maximum(keep_len[:-1], shared, out=keep_len[:-1])
    keep_len += 1
    return rep, keep_len, shared


def _levels(columns, rep_doc, keep_len, path_len, n_nodes):
    """edge_key, leaf_count and child_ptr of the trie of the shortened paths, filled level by
    level (CHUNK paths at a time), and the leaf node of each path. Sorted paths give
    non-decreasing (parent, token) keys at every depth, so new nodes are where the key changes."""
    n_paths = len(rep_doc)
    edge_key = np.empty(n_nodes, np.int64)
    leaf_count = np.zeros(n_nodes, _index_dtype(n_paths))
    child_ptr = np.zeros(n_nodes + 1, _index_dtype(n_nodes))
    edge_key[0], leaf_count[0], child_ptr[0] = -1, n_paths, 1
    node = np.zeros(n_paths, _index_dtype(n_nodes))  # each path's node at the current depth
    end = 1  # nodes made so far
    for depth in range(int(path_len.max())):
        last = -2  # key of the last node made at this depth (keys are >= 0)
        for a in range(0, n_paths, CHUNK):
            sel = a + np.flatnonzero(path_len[a:a + CHUNK] > depth)
            if sel.size == 0:
                continue
            parent = node[sel]
            key = parent.astype(np.int64)
            key *= columns.key_base
            key += np.where(depth < keep_len[sel], columns(rep_doc[sel], depth), columns.end_id)
            new = np.empty(sel.size, bool)
            new[0] = key[0] != last
            np.not_equal(key[1:], key[:-1], out=new[1:])
            first = np.flatnonzero(new)
            edge_key[end:end + first.size] = key[first]
            last = key[-1]
            here = np.cumsum(new, dtype=node.dtype)
            here += end - 1
            node[sel] = here
            leaf_count[here[0]:here[-1] + 1] += np.bincount(here - here[0]).astype(leaf_count.dtype)
            if first.size:
                parent = parent[first]
                child_ptr[parent[0] + 1:parent[-1] + 2] += np.bincount(parent - parent[0]).astype(child_ptr.dtype)
            end += first.size
    assert end == n_nodes, "node count mismatch"
    np.cumsum(child_ptr, dtype=child_ptr.dtype, out=child_ptr)
    return edge_key, leaf_count, child_ptr, node


def _leaf_documents(perm, rep, leaf_order):
    """(leaf_doc_ptr, slot_doc): the documents of a leaf are the rows of its run of identical
    sequences in sorted order (already sorted by id); leaf l is the run that starts at rep[leaf_order[l]]."""
    n = len(perm)
    leaf_doc_ptr = np.arange(len(rep) + 1, dtype=_index_dtype(n))
    if len(rep) == n:  # every run is one row
        return leaf_doc_ptr, perm[leaf_order]
    sizes = np.diff(rep, append=n)[leaf_order]
    np.cumsum(sizes, dtype=leaf_doc_ptr.dtype, out=leaf_doc_ptr[1:])
    slot = np.repeat(rep[leaf_order] - leaf_doc_ptr[:-1], sizes)
    slot += np.arange(n, dtype=slot.dtype)
    return leaf_doc_ptr, perm[slot]


def _pack_ids(ids, order):
    """(ptr, UTF-8 bytes) of ids[order], encoded CHUNK ids at a time."""
    sizes = np.empty(len(order), np.int32)
    blob = bytearray()  # grows in place: no second copy of the bytes
    for a in range(0, len(order), CHUNK):
        chunk = ids[order[a:a + CHUNK]].tolist()
        data = np.frombuffer("\x00".join(chunk).encode("utf-8"), np.uint8)
        sep = np.flatnonzero(data == 0)
        if sep.size != len(chunk) - 1:
            raise ValueError("document ids must not contain NUL characters")
        sizes[a:a + len(chunk)] = np.diff(sep, prepend=-1, append=data.size) - 1
        blob += np.delete(data, sep).tobytes()
    ptr = np.zeros(len(order) + 1, _index_dtype(len(blob)))
    np.cumsum(sizes, dtype=ptr.dtype, out=ptr[1:])
    return ptr, np.frombuffer(blob, np.uint8)


class PrefixTree:
    """Static DocID trie in flat arrays; build with `build`, `from_token_ids` or `load`."""

    def __init__(self, arrays, meta):
        for name in ARRAYS:
            setattr(self, name, arrays[name])
        self.end_id = int(meta["end_id"])
        self.key_base = int(meta["key_base"])
        self.max_depth = int(meta["max_depth"])
        self.stats = dict(meta.get("stats", {}))
        self.source = meta.get("source")  # a fingerprint of the build input, set by the caller

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
        # Token ids go to numpy a chunk at a time: Python lists of ints cost ~40 bytes per token.
        parts = [_csr(tokenizer(texts[start:start + TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"])
                 for start in range(0, len(texts), TOKENIZE_CHUNK)] or [_csr([])]
        tokens, lengths = (np.concatenate(arrays) for arrays in zip(*parts))
        return cls.from_arrays(doc_ids, tokens, lengths, end_id, max_tokens, skip_empty)

    @classmethod
    def from_token_ids(cls, pairs, end_id, max_tokens=MAX_DOCID_TOKENS, skip_empty=False):
        """Trie of `(doc_id, token_ids)` pairs (token ids without the end token)."""
        doc_ids, seqs = [], []
        for doc_id, seq in pairs:
            doc_ids.append(doc_id)
            seqs.append(seq)
        return cls.from_arrays(doc_ids, *_csr(seqs), end_id, max_tokens, skip_empty)

    @classmethod
    def from_arrays(cls, doc_ids, tokens, lengths, end_id, max_tokens=MAX_DOCID_TOKENS, skip_empty=False):
        """Trie of DocIDs given as CSR token arrays: DocID i is tokens[sum(lengths[:i]):][:lengths[i]]."""
        ids, columns, stats = _checked_columns(doc_ids, tokens, lengths, end_id, max_tokens, skip_empty)
        # Intermediates are deleted once spent: at millions of DocIDs each holds tens of MB.
        perm, first_diff = _sort_rows(columns, len(ids))
        _order_ties_by_id(perm, first_diff, columns.width, ids)
        rep, keep_len, shared = _unique_prefix_lengths(first_diff, columns.width)
        del first_diff
        rep_doc = perm[rep]
        path_len = keep_len + (columns(rep_doc, keep_len - 1) != columns.end_id)
        # Each path adds a node per token past the prefix it shares with the previous sorted path.
        n_nodes = 1 + int(path_len.sum(dtype=np.int64)) - int(shared.sum(dtype=np.int64))
        del shared
        edge_key, leaf_count, child_ptr, node = _levels(columns, rep_doc, keep_len, path_len, n_nodes)
        key_base, end_id = columns.key_base, columns.end_id
        del rep_doc, keep_len, columns
        # Leaf ids follow node order: by depth (the path length), then by sorted path.
        leaf_order = _stable_order(path_len, int(path_len.max()))
        max_depth, n_paths = int(path_len.max()), len(rep)
        del path_len
        leaf_node = node[leaf_order]
        del node
        leaf_doc_ptr, slot_doc = _leaf_documents(perm, rep, leaf_order)
        del perm, rep, leaf_order
        doc_id_ptr, doc_id_bytes = _pack_ids(ids, slot_doc)
        stats.update(docs=len(ids), leaves=n_paths, nodes=n_nodes)
        arrays = {"edge_key": edge_key, "child_ptr": child_ptr, "leaf_count": leaf_count, "leaf_node": leaf_node,
                  "leaf_doc_ptr": leaf_doc_ptr, "doc_id_ptr": doc_id_ptr, "doc_id_bytes": doc_id_bytes}
        log.info("prefix tree: %d documents, %d leaves, %d nodes, depth %d", len(ids), n_paths, n_nodes, max_depth)
        return cls(arrays, {"end_id": end_id, "key_base": key_base, "max_depth": max_depth, "stats": stats})

    # ----- queries -----

    @property
    def n_nodes(self):
        return len(self.edge_key)

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
        key, out = int(self.edge_key[self.leaf_node[leaf]]), []
        while key >= 0:
            node, token = divmod(key, self.key_base)
            out.append(token)
            key = int(self.edge_key[node])
        return out[::-1]

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
        return (self.edge_key[self.child_ptr[node]:self.child_ptr[node + 1]] % self.key_base).tolist()

    # ----- storage -----

    def save(self, path):
        """Write each array as .npy and meta.json (with `self.source`) to a temporary directory renamed
        to `path` once complete: a killed save never looks complete."""
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
        try:
            os.chmod(tmp, umask_mode(directory=True))  # mkdtemp makes it 0700
            for name in ARRAYS:
                np.save(os.path.join(tmp, name + ".npy"), getattr(self, name))
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump({"format": FORMAT_VERSION, "end_id": self.end_id, "key_base": self.key_base,
                           "max_depth": self.max_depth, "stats": self.stats, "source": self.source}, f, indent=2)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path, mmap=True):
        """Load a saved tree (with mmap: read-only memory maps shared between processes); a missing,
        unreadable or inconsistent file raises TrieCacheError naming it."""
        try:
            arrays = {}
            for name in ARRAYS:
                file = os.path.join(path, name + ".npy")
                arrays[name] = a = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
                size = _SAVED_LENGTH[name](arrays) if name in _SAVED_LENGTH else len(a)
                if a.ndim != 1 or a.dtype.kind not in "iu" or len(a) != size:
                    raise ValueError(f"{a.dtype} array of shape {a.shape}, expected {size} integers")
            file = os.path.join(path, "meta.json")
            with open(file, encoding="utf-8") as f:
                meta = json.load(f)
            if meta.get("format") not in (1, FORMAT_VERSION):
                raise ValueError(f"format {meta.get('format')}, expected {FORMAT_VERSION}")
            return cls(arrays, meta)
        except (OSError, ValueError, EOFError, KeyError, TypeError, IndexError) as e:
            raise TrieCacheError(f"{file}: unreadable prefix tree cache ({type(e).__name__}: {e})") from e


class TrieCacheError(ValueError):
    """A saved prefix tree that cannot be loaded; the message names the file."""


# Length of a saved array given the arrays before it in ARRAYS: a truncated or mixed-up file breaks it.
_SAVED_LENGTH = {"child_ptr": lambda a: len(a["edge_key"]) + 1, "leaf_count": lambda a: len(a["edge_key"]),
                 "leaf_doc_ptr": lambda a: len(a["leaf_node"]) + 1, "doc_id_bytes": lambda a: int(a["doc_id_ptr"][-1]),
                 "doc_id_ptr": lambda a: int(a["leaf_doc_ptr"][-1]) + 1}
