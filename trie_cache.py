"""A corpus's prefix tree cached on disk under a fingerprint of its DocIDs and the tokenizer: loaded
while both are unchanged, rebuilt when either changes or the saved tree does not load."""
import hashlib
import json
import logging
import os

from prefix_tree import PrefixTree, TrieCacheError

log = logging.getLogger("trie_cache")


def load_or_build(path, pairs, tokenizer, name, save=True):
    """The prefix tree of `pairs` ([(doc id, DocID)]) under `tokenizer`: the one saved at `path` when its
    fingerprint matches, else built (and saved there when `save`: one process of a launch); `name` (the
    corpus) labels the log lines."""
    digest = hashlib.sha1(json.dumps([pairs, len(tokenizer), tokenizer.eos_token]).encode()).hexdigest()
    if os.path.exists(path):
        try:
            tree = PrefixTree.load(path)
            if tree.source == digest:
                return tree
        except TrieCacheError as e:
            log.warning("%s: %s; rebuilding it", name, e)
    tree = PrefixTree.build(pairs, tokenizer)
    tree.source = digest
    if save:
        tree.save(path)
        log.info("%s: prefix tree of %d DocIDs (%d leaves) -> %s", name, len(pairs), tree.n_leaves, path)
    return tree
