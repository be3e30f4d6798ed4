"""Sampling primitives of the decoder: the reverse-annealed temperature schedule, per-row
sampling settings (`RowWarper`) and keyed uniform random numbers, so that a query draws the same
DocIDs whatever batch or process decodes it.
"""
import zlib

import numpy as np
import torch


def _int64(value):
    """A 64-bit constant as a signed int64 (torch integer arithmetic wraps around)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_MIX1, _MIX2 = _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)
_KEYS = [_int64(0x9E3779B97F4A7C15), _int64(0xD1B54A32D192ED03), _int64(0xABC98388FB8FAC03),
         _int64(0x8CB92BA72F3D8DD7)]


def _shift(x, bits):
    """Logical right shift of int64 values."""
    return torch.bitwise_right_shift(x, bits) & ((1 << (64 - bits)) - 1)


def counter_uniform(*keys):
    """Uniforms in (0, 1) that depend only on the integer keys (broadcast together), not on the
    batch they are drawn in: a SplitMix64 finaliser over a mix of the keys."""
    x = torch.zeros((), dtype=torch.long, device=keys[0].device)
    for key, mult in zip(keys, _KEYS):
        x = (x + key.long()) * mult
        x = x ^ _shift(x, 29)
    x = (x ^ _shift(x, 30)) * _MIX1
    x = (x ^ _shift(x, 27)) * _MIX2
    x = x ^ _shift(x, 31)
    return (_shift(x, 40).float() + 0.5) / float(1 << 24)


def query_seed(seed, key):
    """A query's random stream: the run's seed and a stable key (its qid), so that a query draws the
    same DocIDs whatever batch or process decodes it."""
    return zlib.crc32(f"{seed}:{key}".encode()) | (int(seed) << 32)


def annealed_temperature(i, K, k, m, t_max):
    """t_i = T_max * (s(k(i/K - m)) - s(-km)) / (s(k(1 - m)) - s(-km)), s the logistic sigmoid."""
    def s(z):
        return 1.0 / (1.0 + np.exp(-z))
    return t_max * (s(k * (np.asarray(i, dtype=np.float64) / K - m)) - s(-k * m)) / (s(k * (1 - m)) - s(-k * m))


def reverse_annealed_temperatures(K, k, m, t_max):
    """Temperatures t_0 .. t_{K-1} (t_0 = 0, rising towards t_max)."""
    return annealed_temperature(np.arange(K), K, k, m, t_max)


class RowWarper:
    """Per-row sampling settings: temperature (0 = greedy: the best token, the lowest id on ties,
    as argmax), then top-k (0 = off), then top-p (1 = off); each a scalar or one value per row
    (transformers' warpers take one scalar and refuse 0). `pick` works on candidate lists sorted
    best first; `__call__` and `sample` on logits over the whole vocabulary."""

    def __init__(self, temperature=0.0, top_k=0, top_p=1.0, device="cpu"):
        self.temperature = torch.as_tensor(temperature, dtype=torch.float32, device=device).reshape(-1, 1)
        self.top_k = torch.as_tensor(top_k, dtype=torch.long, device=device).reshape(-1, 1)
        self.top_p = torch.as_tensor(top_p, dtype=torch.float32, device=device).reshape(-1, 1)
        self.greedy = self.temperature <= 0
        self.all_greedy, self.any_greedy = bool(self.greedy.all()), bool(self.greedy.any())
        top_k_on = self.top_k > 0
        self.k_max = int(self.top_k.max()) if bool(top_k_on.all()) else None  # None: a row keeps every token
        self.filtered = bool(top_k_on.any()) or bool((self.top_p < 1).any())

    @staticmethod
    def _best(values, tokens):
        """Column of the best candidate, the lowest token id among equal values."""
        return tokens.masked_fill(values < values[:, :1], torch.iinfo(tokens.dtype).max).argmin(1)

    def filter(self, values, tokens):
        """Scaled values of candidates sorted best first, -inf where the settings drop them."""
        t = self.temperature
        scaled = values / torch.where(self.greedy, 1.0, t)
        rank = torch.arange(values.shape[1], device=values.device)
        keep = rank < torch.where(self.top_k > 0, self.top_k, values.shape[1])
        if self.filtered:
            probs = scaled.masked_fill(~keep, float("-inf")).softmax(1)
            keep = keep & ((probs.cumsum(1) - probs < self.top_p) | (rank == 0))
        if self.any_greedy:
            keep = torch.where(self.greedy, rank == self._best(values, tokens)[:, None], keep)
        return scaled.masked_fill(~keep, float("-inf"))

    def pick(self, values, tokens, generator=None, uniform=None):
        """Column of the chosen candidate per row (candidates sorted best first, -inf padding).
        `uniform` (same shape, in (0, 1)) replaces the generator's noise when given."""
        if self.all_greedy:
            return self._best(values, tokens)
        probs = self.filter(values, tokens).softmax(1)
        # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) picks i with probability p_i.
        if uniform is None:
            race = torch.empty_like(probs).exponential_(generator=generator)
        else:
            race = -torch.log(uniform.to(probs.dtype))
        return (probs / race.clamp_(min=torch.finfo(probs.dtype).tiny)).argmax(1)

    def top(self, scores):
        """(values, tokens) of full-vocabulary logits, best first, as many as the settings can keep."""
        if self.all_greedy:
            best = scores.argmax(1, keepdim=True)
            return scores.gather(1, best), best
        # Masked (-inf) logits are never candidates: without top-k look only as deep as the widest row needs.
        k = min(self.k_max, scores.shape[1]) if self.k_max else int(torch.isfinite(scores).sum(1).max())
        return scores.topk(k, dim=1)

    def __call__(self, scores):
        """Warped logits over the whole vocabulary (-inf outside the kept candidates)."""
        values, tokens = self.top(scores)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, self.filter(values, tokens))

    def sample(self, scores, generator=None):
        """One token per row drawn from full-vocabulary logits."""
        values, tokens = self.top(scores)
        return tokens.gather(1, self.pick(values, tokens, generator)[:, None]).squeeze(1)
