"""The ranking loss's batches over a training set (train_data.TrainingSet): each group a document's
first training query with that document and BM25 negatives, scored by the ranking token."""
import logging
import os
import random

import numpy as np

import bm25
import lm
import sft
from train_data import encode, redrawn

log = logging.getLogger("rank_groups")

PAD_DOCID = "NONE"  # RANKNET_MODE "released": the DocID of the candidates that fill a short ranking group


class RankGroups(sft.SeededBatches):
    """The ranking loss's batches: every rank_every steps, batch_size // group_size random groups (drawn by
    `rng`, whose state the epoch checkpoints keep), each a document's first training query with that
    document and group_size - 1 negatives drawn from the query's BM25 top negative_depth (over `index`, a
    BM25Index or the corpus rows; searched when the group is first drawn, kept in bm25_top) minus the
    positive and documents without a DocID (`docids`: doc id -> DocID). ranknet_mode "released": drawn again by
    `rng` at each draw, a short group padded with PAD_DOCID; "joint": by a generator seeded with (seed, group),
    the same at every draw, random documents with a DocID top up a short list (off with < group_size DocIDs).
    With DOCASQ_REDRAW, a group whose query is a DocAsQ passage gets a new window of its document at each draw
    (its BM25 candidates stay those of the stored passage)."""

    def __init__(self, tokenizer, index, docids, data, token_id, settings):
        self.index = index if isinstance(index, bm25.BM25Index) else \
            bm25.BM25Index(index, settings.bm25_stemmer, settings.bm25_positive_only)
        self.tokenizer, self.docids, self.data = tokenizer, docids, data
        self.token_id, self.settings = token_id, settings
        self.top = np.load(os.path.join(data.folder, "bm25_top.npy"), mmap_mode="r+")
        self.known = np.zeros(len(data.groups), bool)
        self.rng = random.Random(settings.seed)
        self.per_step = max(1, settings.batch_size // settings.group_size)
        fills = settings.ranknet_mode == "released" or len(docids) >= settings.group_size  # joint: enough DocIDs
        self.active = len(data.groups) > 0 and fills
        log.info("ranking loss: %d groups of %d (every %d steps, %s)%s", len(data.groups), settings.group_size,
                 settings.rank_every, settings.ranknet_mode, "" if self.active else f"; off: {len(docids)} DocIDs")

    def __call__(self, step):
        if not self.active or step % self.settings.rank_every != 0:
            return None
        examples, n = [], len(self.data.groups)
        for group in self.rng.sample(range(n), min(self.per_step, n)):
            example = int(self.data.groups[group])
            stored = self.data.row(example)  # its BM25 candidates: those of the stored query, whenever first drawn
            row = redrawn(self.data, example, stored, self.settings, f"{self.settings.seed}:rank:{step}:{group}")
            positive = self.data.docs.ids[int(self.data.doc[example])]
            gists = [self.docids[d] for d in [positive] + self.negatives(group, stored["query"], positive)]
            for gist in gists + [PAD_DOCID] * (self.settings.group_size - len(gists)):
                examples.append(encode(self.tokenizer, row, gist, self.settings))
        batch = lm.collate(examples, self.tokenizer.pad_token_id)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "token_id": self.token_id, "group_size": self.settings.group_size}

    def candidates(self, group, query):
        """Corpus positions of a group's BM25 top documents, searched on first use."""
        if not self.known[group]:
            found = self.index.search_indices([query], self.top.shape[1])[0]
            row = np.full(self.top.shape[1], -1, np.int32)
            row[:len(found)] = found
            self.top[group] = row  # one write: processes filling the same group write the same bytes
            self.known[group] = True
        row = np.asarray(self.top[group])
        return row[row >= 0]

    def negatives(self, group, query, positive):
        ids, want = self.index.doc_ids, self.settings.group_size - 1
        found = [ids[i] for i in self.candidates(group, query).tolist()]
        found = [d for d in found if d != positive and d in self.docids]
        if self.settings.ranknet_mode == "released":  # drawn again, by the generator the checkpoints keep
            return self.rng.sample(found, min(want, len(found)))
        rng = np.random.default_rng([self.settings.seed, group])
        if len(found) >= want:
            return [found[j] for j in rng.choice(len(found), want, replace=False)]
        while len(found) < want:
            doc_id = ids[int(rng.integers(len(ids)))]
            if doc_id != positive and doc_id not in found and doc_id in self.docids:
                found.append(doc_id)
        return found
