"""Batched trie-constrained decoding of DocIDs: the logits processor and the reverse-annealed decoder.

A query's DocIDs are drawn one after another under the prefix tree, each removed from that
query's tree before the next draw (sampling without replacement); draw i uses temperature t_i of
the reverse-annealed schedule (t_0 = 0: the first DocID is greedy) with top-k / top-p. Here many
queries decode together: their prompts are encoded once (left padding) and every DocID continues
from the prompt's KV cache instead of re-encoding it; each row carries its own temperature and
removal state, and rows advance independently, so a short DocID never waits for a long one.
For greedy settings the result equals one `generate` call per DocID and query.

    results = decode(model, tree, prompts, settings)  # prompts: chat-encoded token-id lists
    results[q].ranking                                # [(doc_id, 1/rank)], at most settings.max_results
    results[q].leaves                                 # decoded leaves, in order

Modes (the decoding ablation): greedy, iterative_greedy, nucleus, reverse_annealed, beam.
`TrieLogitsProcessor` applies the same constraint inside transformers `generate`.
"""
import inspect
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, LogitsProcessor

from device_trie import DeviceTrie, Removals, _live_candidates, _RootCandidates
from lm import pad_rows
from sampling import RowWarper, counter_uniform, query_seed, reverse_annealed_temperatures

log = logging.getLogger("decoding")

COLUMN_BUDGET = 32    # generated cache columns before the cache is cropped back to the prompts
MODES = ("greedy", "iterative_greedy", "nucleus", "reverse_annealed", "beam")


@dataclass(frozen=True)
class DecodeSettings:
    """How `decode` decodes (DESIGN.md 6); genir builds it from its constants."""
    mode: str                      # one of MODES
    K: int                         # DocIDs per query
    slope: float                   # k of the reverse-annealed schedule
    midpoint: float                # m: its midpoint, as a fraction of K
    t_max: float                   # temperature reached at i = K
    top_k: int                     # sampled draws: 0 = off
    top_p: float                   # sampled draws: 1 = off
    nucleus_temperature: float     # the temperature of every draw in nucleus mode
    num_beams: int | None          # beam mode; None: K beams
    beam_token_budget: int | None  # beam mode: queries x beams x longest prompt per batch; None: no limit
    draws_per_round: int           # > 1: rows per query drawing side by side (faster, approximate)
    max_results: int               # documents per query in the ranking
    batch_size: int                # queries decoded together (beam mode: times num_beams rows)
    seed: int                      # with each query's key, seeds its sampling

    def schedule(self):
        """The reverse-annealed temperatures t_0 .. t_{K-1}."""
        return reverse_annealed_temperatures(self.K, self.slope, self.midpoint, self.t_max)


class TrieLogitsProcessor(LogitsProcessor):
    """Masks each row to its trie's allowed next tokens, then applies per-row sampling settings
    (a `RowWarper`: temperature, 0 = greedy, then top-k and top-p; scalars or one value per row).

    With `removals`, `row_query` names each row's query and the leaves that query has already
    decoded are masked. A step costs a few tensor operations whatever the number of rows.

    With transformers `generate`: left-pad the prompts to `prompt_len`, pass
    `logits_processor=LogitsProcessorList([processor])` and either `do_sample=False` (greedy) or
    `do_sample=True, temperature=1.0, top_k=0, top_p=1.0` so that its own warpers are no-ops.
    Each call re-walks the generated suffix from the root, so reordered beams and finished rows
    (padded after the end token) are handled. A loop that tracks its rows' trie nodes calls
    `process` or `sample` with them; `decode` works on the same trie and removal state through
    per-node candidate lists (`_live_candidates`), which never touch the whole vocabulary.
    """

    supports_continuous_batching = False

    def __init__(self, trie, prompt_len=0, temperature=0.0, top_k=0, top_p=1.0, removals=None, row_query=None):
        self.trie, self.prompt_len, self.removals = trie, prompt_len, removals
        self.warper = RowWarper(temperature, top_k, top_p, self.trie.device)
        self.row_query = None if row_query is None else torch.as_tensor(row_query, dtype=torch.long,
                                                                        device=self.trie.device)

    def __call__(self, input_ids, scores):
        nodes = self.trie.walk(input_ids[:, self.prompt_len:].to(self.trie.device))
        return self.process(scores, nodes)

    def mask(self, scores, nodes):
        """Float logits (rows, vocab) of rows standing at trie `nodes`, -inf where not allowed."""
        return scores.masked_fill(~self.trie.allowed_mask(nodes, self.row_query, self.removals), float("-inf"))

    def process(self, scores, nodes):
        """Masked and warped logits."""
        return self.warper(self.mask(scores, nodes))

    def sample(self, scores, nodes, generator=None):
        """One allowed token per row, drawn with the row's settings."""
        return self.warper.sample(self.mask(scores, nodes), generator)


class PromptBatch:
    """Left-padded prompts encoded once; each row decodes on top of its prompt's KV cache.

    `step` appends one column (one token per row) and returns the next logits; a row can mask its
    generated columns (`forget`) to start a new DocID at once, and `rewind` crops the cache back to
    the prompts, so DocIDs never re-encode the prompt.
    """

    def __init__(self, model, prompts, repeats=1):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.24
        self.keep_last = "logits_to_keep" in params
        device = model.device
        lengths = torch.tensor([len(p) for p in prompts])
        if int(lengths.min()) == 0:
            raise ValueError("empty prompt")
        ids, mask = pad_rows(prompts, 0, left=True)  # the pad value is masked out
        ids, mask = ids.to(device), mask.to(device)
        self.cache = DynamicCache(config=model.config)
        logits = self._forward(ids, mask, (mask.cumsum(1) - 1).clamp(min=0))
        if repeats > 1:
            self.cache.batch_repeat_interleave(repeats)
        self.first_logits = logits.repeat_interleave(repeats, 0)
        self.mask = mask.repeat_interleave(repeats, 0)
        self.lengths = lengths.to(device).repeat_interleave(repeats)
        self.live = self.mask[:, :0]  # which generated columns each row attends to

    def _forward(self, ids, mask, positions):
        kwargs = {self.cache_arg: self.cache, "use_cache": True}
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1].float()

    @property
    def n_new(self):
        return self.live.shape[1]

    def step(self, tokens, depth, feed=None):
        """Append one token per row at position prompt length + depth (its index in the row's
        DocID); rows where `feed` is False add a masked placeholder. Returns the next logits."""
        column = torch.ones_like(self.lengths) if feed is None else feed.long()
        self.live = torch.cat([self.live, column[:, None]], 1)
        positions = (self.lengths + depth)[:, None]
        return self._forward(tokens[:, None], torch.cat([self.mask, self.live], 1), positions)

    def last_hidden(self, tokens, lengths):
        """Each row's last hidden state after its first `lengths[i]` `tokens` (right-padded), fed on
        top of its prompt in one pass; the cache keeps them (rewind drops them)."""
        offsets = torch.arange(tokens.shape[1], device=self.lengths.device)
        self.live = torch.cat([self.live, (offsets < lengths[:, None]).long()], 1)
        hidden = self.model.get_decoder()(input_ids=tokens, attention_mask=torch.cat([self.mask, self.live], 1),
                                          position_ids=self.lengths[:, None] + offsets, use_cache=True,
                                          **{self.cache_arg: self.cache}).last_hidden_state
        return hidden[torch.arange(len(tokens), device=hidden.device), (lengths - 1).clamp(min=0)]

    def forget(self, rows):
        """Mask every generated column of the rows selected by a bool tensor."""
        self.live = self.live.masked_fill(rows[:, None], 0)

    def rewind(self):
        if self.n_new:
            self.cache.crop(-self.n_new)
            self.live = self.live[:, :0]

    def reorder(self, rows):
        """Make row i continue from row rows[i] (beam search)."""
        self.cache.reorder_cache(rows)
        self.mask, self.lengths, self.live = self.mask[rows], self.lengths[rows], self.live[rows]


@dataclass
class Retrieval:
    """One query's result: decoded leaves in rank order, and the documents they expand to."""
    leaves: list = field(default_factory=list)
    ranking: list = field(default_factory=list)  # [(doc_id, score)], strictly decreasing scores


class _Draws:
    """Sampled decoding of a batch: `run` returns each query's leaves, its i-th DocID drawn at
    temperatures[i] and removed from its tree before the next one (`draws` rows per query side by side).

    Rows advance independently: a row that completes a DocID masks its cache columns and starts
    its next draw at once from the cached prompt logits, so no row waits for the longest DocID in
    the batch, and DocIDs that need no forward pass cost none. Each forward pass feeds every row
    that has drawn a token. After COLUMN_BUDGET columns new draws pause until the running ones
    end, and the cache is cropped back to the prompts. Candidates are the live children of each
    row's node only: no step scans the vocabulary. The noise of a draw is a function of the
    query's seed, the draw index, the depth and the token (`counter_uniform`), so a query's
    DocIDs do not depend on the batch or the process it is decoded in.
    """

    def __init__(self, model, trie, prompts, temperatures, top_k, top_p, draws, seeds):
        n_queries, n_draws, device = len(prompts), len(temperatures), trie.device
        self.trie, self.top_k, self.top_p, self.draws, self.n_draws = trie, top_k, top_p, draws, n_draws
        self.batch = PromptBatch(model, prompts, repeats=draws)
        self.removals = Removals(trie, n_queries)
        self.row_query = torch.arange(n_queries, device=device).repeat_interleave(draws)
        self.seeds = torch.as_tensor(seeds, dtype=torch.long, device=device)
        self.temperatures = torch.as_tensor(temperatures, dtype=torch.float32, device=device)
        self.roots = _RootCandidates(trie, self.batch.first_logits, top_k + n_draws if top_k else None)
        self.found = torch.full((n_queries, n_draws), -1, dtype=torch.long, device=device)
        self.found_draw = torch.full((n_queries, n_draws), torch.iinfo(torch.long).max, device=device)
        self.n_found = torch.zeros(n_queries, dtype=torch.long, device=device)
        self.nodes = torch.zeros(n_queries * draws, dtype=torch.long, device=device)  # 0: the root, to start a draw
        self.depth = torch.zeros_like(self.nodes)   # tokens of the row's current DocID in the cache
        self.tokens = torch.zeros_like(self.nodes)  # last token drawn, fed by the next forward pass
        self.row_draw = torch.arange(draws, device=device).repeat(n_queries)  # index of the row's current draw
        self.next_draw = torch.full_like(self.n_found, draws)
        self.draining = False

    def run(self):
        """Draw until every query has its DocIDs or has exhausted its tree; the leaves per query."""
        logits = self.batch.first_logits
        while True:
            todo = (self.nodes > 0) | ((self.nodes == 0) & self._may_start())  # rows with fresh logits
            fed = torch.zeros_like(todo)
            while bool(todo.any()):
                todo = self._advance(todo, logits, fed)
            if bool(fed.any()):
                logits = self.batch.step(self.tokens, self.depth, fed)
                self.depth += fed.long()
                self.draining = self.draining or self.batch.n_new >= COLUMN_BUDGET
            elif self.batch.n_new:
                self.batch.rewind()
                self.draining = False
            else:  # rank by draw (the order of the schedule), not by the time a draw completed
                found = self.found.gather(1, self.found_draw.argsort(dim=1, stable=True))
                return [self.trie.leaf_index(row[row >= 0]).tolist() for row in found]

    def _may_start(self):
        """Rows that may start a draw: their query wants more DocIDs and has live leaves."""
        q = self.row_query
        return (self.n_found[q] < self.n_draws) & ~self.removals.exhausted[q] & (not self.draining)

    def _advance(self, todo, logits, fed):
        """One token per `todo` row; marks the rows to feed in `fed`; returns the rows that start a draw."""
        idx = torch.nonzero(todo).squeeze(1)
        q = self.row_query[idx]
        drawn, reached, lost = self._draw(idx, q, logits)
        keep = self._record_leaves(idx, q, reached, lost)
        restart = keep | lost  # a leaf not kept (repeated, past the draws) restarts its row a step later, as lost
        self.nodes[idx] = torch.where(restart, 0, reached)
        self.tokens[idx] = drawn.clamp(min=0)  # a lost row feeds a masked placeholder
        fed[idx] = ~restart
        # The next draw indices of the query; with draws > 1 a lost or repeated draw leaves a gap.
        restarted = torch.zeros_like(todo).index_fill_(0, idx[restart], True)
        self.depth.masked_fill_(restarted, 0)
        per_query = restarted.view(-1, self.draws)
        rank = per_query.cumsum(1).view(-1) - 1
        self.row_draw = torch.where(restarted, self.next_draw[self.row_query] + rank, self.row_draw)
        self.next_draw += per_query.sum(1)
        self.batch.forget(restarted)
        return restarted & self._may_start()

    def _draw(self, idx, q, logits):
        """(token drawn, node reached, lost: no live child) of rows idx, at their draws' temperatures."""
        trie, row_draw = self.trie, self.row_draw[idx]
        warper = RowWarper(self.temperatures[row_draw.clamp(max=self.n_draws - 1)], self.top_k, self.top_p,
                           trie.device)
        values, children = _live_candidates(trie, self.removals, self.roots, logits, idx, q, self.nodes[idx],
                                            warper.k_max)
        tokens = trie.token[children.clamp(min=0)]
        uniform = counter_uniform(self.seeds[q][:, None], row_draw[:, None], self.depth[idx][:, None], tokens)
        pick = warper.pick(values, tokens, uniform=uniform)[:, None]
        lost = ~torch.isfinite(values[:, 0])  # no live child: another row of the query emptied the subtree
        reached = torch.where(lost, -1, children.gather(1, pick).squeeze(1))
        # A complete unique prefix allows only the end token: take it without a forward pass.
        end_child = trie.end_child(reached)
        reached = torch.where(end_child >= 0, end_child, reached)
        return tokens.gather(1, pick).squeeze(1), reached, lost

    def _record_leaves(self, idx, q, reached, lost):
        """Record the leaves rows idx reached (each once, within the query's draws); which were kept."""
        keep = self.trie.is_leaf(reached)
        if self.draws > 1:  # keep a leaf new to the query, once: the other rows draw again
            unique, inverse = torch.unique(torch.where(keep, q * self.trie.n_nodes + reached, -1 - idx),
                                           return_inverse=True)
            first = torch.full_like(unique, len(self.nodes)).scatter_reduce_(0, inverse, idx, "amin")
            keep &= first[inverse] == idx
        elif bool(lost.any()):
            raise RuntimeError("constrained decoding left the prefix tree (inconsistent tree or removals)")
        # Rows are grouped by query, so a running count gives each kept leaf its rank.
        kept = torch.zeros_like(self.nodes, dtype=torch.bool).index_fill_(0, idx[keep], True)
        position = (self.n_found[self.row_query] + kept.view(-1, self.draws).cumsum(1).view(-1) - 1)[idx]
        keep &= position < self.n_draws
        q, leaf, position = q[keep], reached[keep], position[keep]
        self.found[q, position] = leaf
        self.found_draw[q, position] = self.row_draw[idx[keep]]
        self.n_found.index_add_(0, q, torch.ones_like(q))
        self.removals.add(q, leaf)
        return keep


def _beam_search(model, trie, prompts, n_leaves, num_beams):
    """Up to n_leaves distinct leaves per query by constrained beam search, best log-prob first."""
    n_queries, width = len(prompts), num_beams
    device, end, vocab = trie.device, trie.end_id, trie.vocab_size
    batch = PromptBatch(model, prompts, repeats=width)
    neg_inf = float("-inf")
    score = torch.full((n_queries, width), neg_inf, device=device)
    score[:, 0] = 0.0  # all beams start at the root: expand one of them
    nodes = torch.zeros(n_queries * width, dtype=torch.long, device=device)
    pool_score = torch.full((n_queries, n_leaves), neg_inf, device=device)
    pool_leaf = torch.full((n_queries, n_leaves), -1, dtype=torch.long, device=device)
    base = (torch.arange(n_queries, device=device) * width)[:, None]
    logits = batch.first_logits
    for step in range(trie.max_depth):
        logprobs = logits.log_softmax(1).masked_fill(~trie.allowed_mask(nodes), neg_inf)
        candidates = (score.view(-1, 1) + logprobs).view(n_queries, width * vocab)
        top, index = candidates.topk(min(2 * width, width * vocab), dim=1)
        source = base + index // vocab
        tokens = index % vocab
        child = trie.advance(nodes[source], tokens)
        alive = torch.isfinite(top)
        ended = alive & trie.is_leaf(child)
        merged_score = torch.cat([pool_score, torch.where(ended, top, neg_inf)], 1)
        pool_score, pick = merged_score.topk(n_leaves, dim=1)
        pool_leaf = torch.cat([pool_leaf, child], 1).gather(1, pick)
        running = alive & ~ended
        rank = running.cumsum(1) - 1
        q, c = torch.nonzero(running & (rank < width), as_tuple=True)
        slot = rank[q, c]
        score = torch.full_like(score, neg_inf)
        score[q, slot] = top[q, c]
        new_source = (base + torch.arange(width, device=device)).clone()
        new_source[q, slot] = source[q, c]
        new_nodes = torch.full((n_queries, width), -1, dtype=torch.long, device=device)
        new_nodes[q, slot] = child[q, c]
        new_tokens = torch.full((n_queries, width), end, dtype=torch.long, device=device)
        new_tokens[q, slot] = tokens[q, c]
        # Log-probs only fall as a beam grows: stop once no beam can enter the pool.
        done = score.max(1).values <= pool_score[:, -1]
        score[done] = neg_inf
        if bool(done.all()):
            break
        batch.reorder(new_source.view(-1))
        nodes = new_nodes.view(-1)
        logits = batch.step(new_tokens.view(-1), step)
    return [trie.leaf_index(leaf[torch.isfinite(s)]).tolist() for leaf, s in zip(pool_leaf, pool_score)]


def _query_chunks(order, prompts, batch_size, rows_per_query, token_budget):
    """Consecutive runs of `order` (by ascending prompt length) of at most batch_size queries whose
    rows x longest prompt stay within token_budget (None: no limit); a query alone over it runs alone."""
    chunks, current = [], []
    for i in order:
        over = token_budget is not None and (len(current) + 1) * rows_per_query * len(prompts[i]) > token_budget
        if current and (len(current) == batch_size or over):
            chunks.append(current)
            current = []
        current.append(i)
    return chunks + [current] if current else chunks


def _ranking(tree, leaves, max_results):
    docs = []
    for leaf in leaves:
        docs.extend(tree.leaf_docs(leaf))
        if len(docs) >= max_results:
            break
    return [(doc, 1.0 / rank) for rank, doc in enumerate(docs[:max_results], 1)]


def decode(model, trie, prompts, settings, keys=None, progress=True):
    """One `Retrieval` per prompt (token ids: the chat-encoded query with the assistant generation
    prompt): up to settings.K DocIDs under the prefix tree (a PrefixTree, or a DeviceTrie on the
    model's device). Modes: "greedy" (one DocID), "iterative_greedy" (K greedy draws), "nucleus"
    (at nucleus_temperature), "reverse_annealed" (draw i at t_i), all without replacement, top_k /
    top_p on sampled draws; "beam" (up to K leaves by sequence log-prob). keys (default: positions;
    e.g. qids) seed each query's sampling with settings.seed: a key draws the same DocIDs in any
    batch or process. Each leaf expands to all its documents, cut at max_results."""
    s = settings
    if s.mode not in MODES:
        raise ValueError(f"unknown decoding mode {s.mode!r}; expected one of {', '.join(MODES)}")
    if s.K < 1 or s.batch_size < 1 or s.draws_per_round < 1 or s.max_results < 1:
        raise ValueError("K, batch_size, draws_per_round and max_results must be positive")
    if not 0 < s.top_p <= 1 or s.top_k < 0 or s.nucleus_temperature < 0:
        raise ValueError("need 0 < top_p <= 1, top_k >= 0 and temperature >= 0")
    vocab = model.get_output_embeddings().weight.shape[0]
    if not isinstance(trie, DeviceTrie):
        trie = DeviceTrie(trie, vocab, model.device)
    if trie.vocab_size != vocab or trie.device != model.device:
        raise ValueError("the DeviceTrie must match the model's vocabulary size and device")
    K = 1 if s.mode == "greedy" else s.K
    temperatures = {"greedy": np.zeros(K), "iterative_greedy": np.zeros(K),
                    "nucleus": np.full(K, float(s.nucleus_temperature)), "reverse_annealed": s.schedule()}.get(s.mode)
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
    seeds = [query_seed(s.seed, key) for key in keys]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    num_beams = s.num_beams or K
    chunks = _query_chunks(order, prompts, s.batch_size, num_beams if s.mode == "beam" else s.draws_per_round,
                           s.beam_token_budget if s.mode == "beam" else None)
    leaves = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for index in tqdm(chunks, desc=f"decode ({s.mode})", disable=not progress):
                batch = [prompts[i] for i in index]
                if s.mode == "beam":
                    found = _beam_search(model, trie, batch, K, num_beams)
                else:
                    found = _Draws(model, trie, batch, temperatures, s.top_k, s.top_p, s.draws_per_round,
                                   [seeds[i] for i in index]).run()
                for i, query_leaves in zip(index, found):
                    leaves[i] = query_leaves
    finally:
        model.train(was_training)
    short = sum(len(x) < K for x in leaves)
    if short:
        log.info("%d of %d queries exhausted the tree before %d DocIDs", short, len(prompts), K)
    return [Retrieval(x, _ranking(trie.tree, x, s.max_results)) for x in leaves]
