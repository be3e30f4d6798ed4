"""Evaluation: runs, ir-measures metrics, TREC run files, result tables (with notes on a task's
qrels report), and the statistics and plots of the decoding ablation (qrels are read in data.py,
the BM25 baseline is bm25.py).

Conventions:
- Metrics come from ir-measures over pytrec-eval-terrier (trec_eval semantics): Acc@1 = P@1
  (share of queries whose top document is relevant), nDCG@1 (what the original code logged as its
  "Acc@1"; smaller than P@1 on graded labels), nDCG@10 (linear gain, trec_eval `ndcg_cut`),
  R@100 and MAP. Values are fractions in 0-1; tables print them x100 with one decimal. Both top-1
  measures are kept (metrics.json's "Acc@1" is always P@1): the tables report as Acc@1 the one of
  the caller's definition (genir's ACC1, see ACC1_DEFINITIONS and with_acc1), and average the MAIR
  tasks as the caller says (genir's MAIR_AVERAGE, see MAIR_AVERAGES); a note under each table
  names both.
- Every query of the qrels counts: one missing from the run (or with no relevant label, unless
  dropped: see data.qrels_from_queries) scores 0.
- Runs carry strictly decreasing scores (1/rank), so no tool has to break ties.
"""
import logging
from collections.abc import Mapping

import ir_measures
import numpy as np
from ir_measures import AP, P, R, nDCG

import mair_config
from file_io import DataError, atomic_open, iter_lines

log = logging.getLogger("metrics")

# reported metric name -> ir-measures measure
MEASURES = {"Acc@1": P@1, "nDCG@1": nDCG@1, "nDCG@10": nDCG@10, "R@100": R@100, "MAP": AP}
TABLE_METRICS = ("Acc@1", "nDCG@10", "R@100")  # results.md: one table each, in this order
BEIR_METRIC = "nDCG@10"                         # the paper's BEIR average

MISSING = "–"                 # table cell of a missing result

# The tables' Acc@1 (genir's ACC1): definition -> (the stored measure reported, the note naming it)
ACC1_DEFINITIONS = {
    "p@1": ("Acc@1", "Acc@1 = P@1: the share of queries whose top document is relevant (the paper's accuracy)."),
    "ndcg@1": ("nDCG@1", "Acc@1 = nDCG@1 (the released code's top-1 metric; below P@1 where labels are graded)."),
}
# The tables' MAIR avg (genir's MAIR_AVERAGE): definition -> the note naming it
MAIR_AVERAGES = {
    "domains": "MAIR avg: mean of the per-domain averages, as the paper's main table averages per domain first "
               "(not a mean over tasks).",
    "tasks": "MAIR avg: mean over the MAIR tasks, each task counting once (not a mean of the per-domain averages).",
}


# ----------------------------------------------------------------------------- qrels notes, runs, metrics

def qrels_notes(task, report):
    """Notes for a results table on the data problems of a task's qrels report."""
    notes = []
    if report.get("empty_query"):
        notes.append(f"{task}: {report['empty_query']} empty queries (scored 0)")
    if report.get("unknown_labels"):
        notes.append(f"{task}: {report['unknown_labels']} labels point to documents missing from the corpus "
                     f"(e.g. {', '.join(report.get('unknown_examples', [])[:3])})")
    if report.get("no_relevant"):
        fate = ("left out of the qrels, so no average counts them" if report.get("no_relevant_dropped")
                else "each scores 0 in every average")
        notes.append(f"{task}: {report['no_relevant']} queries have no relevant label (every label scores 0): {fate}")
    return notes


def with_acc1(values, acc1):
    """`values` ({metric: a value, or {query: value}}, as `evaluate` gives them) with "Acc@1" holding
    the measure of the definition `acc1` (a key of ACC1_DEFINITIONS); None where that one is missing."""
    return {**values, "Acc@1": values.get(ACC1_DEFINITIONS[acc1][0])}


def acc1_percent(methods, acc1):
    """{method: Acc@1 x100, to one decimal} of {method: aggregate metrics}, as log lines show it."""
    return {m: round(with_acc1(v, acc1)["Acc@1"] * 100, 1) for m, v in methods.items()}


def run_from_rankings(rankings):
    """{qid: [doc_id, ...]} in rank order -> run {qid: {doc_id: 1/rank}}; a repeated id keeps its first rank."""
    run = {}
    for qid, docs in rankings.items():
        unique = dict.fromkeys(docs)
        run[qid] = {doc: 1.0 / rank for rank, doc in enumerate(unique, 1)}
    return run


def evaluate(qrels, run):
    """(aggregate {name: mean}, per_query {name: {qid: value}}) over every query of `qrels`.

    A query missing from the run, or with an empty ranking, scores 0 on every metric; run queries
    not in the qrels are ignored.
    """
    if not qrels:
        raise ValueError("evaluate: empty qrels")
    name_of = {measure: name for name, measure in MEASURES.items()}
    per_query = {name: dict.fromkeys(qrels, 0.0) for name in MEASURES}
    run = {qid: docs for qid, docs in run.items() if qid in qrels and docs}
    for m in ir_measures.iter_calc(list(MEASURES.values()), qrels, run):
        per_query[name_of[m.measure]][m.query_id] = float(m.value)
    aggregate = {name: float(np.mean(list(values.values()))) for name, values in per_query.items()}
    return aggregate, per_query


def _check_token(value, what):
    value = str(value)
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"TREC run: {what} '{value}' is empty or contains whitespace")
    return value


def write_trec_run(run, path, tag):
    """Atomically write `run` as a 6-column TREC run (qid Q0 doc rank score tag), ranks 1..n by score."""
    tag = _check_token(tag, "tag")
    with atomic_open(path) as f:
        for qid, docs in run.items():
            qid = _check_token(qid, "qid")
            ranked = sorted(docs.items(), key=lambda item: -item[1])  # stable: ties keep run order
            for rank, (doc, score) in enumerate(ranked, 1):
                f.write(f"{qid} Q0 {_check_token(doc, 'doc id')} {rank} {float(score)!r} {tag}\n")


def read_trec_run(path):
    """A TREC run file -> {qid: {doc_id: score}}; a malformed line raises DataError naming path:line."""
    run = {}
    for lineno, line in iter_lines(path):
        try:
            qid, _q0, doc, _rank, score, _tag = line.split()
            run.setdefault(qid, {})[doc] = float(score)
        except ValueError:
            raise DataError(f"{path}:{lineno}: expected 'qid Q0 doc rank score tag'") from None
    return run


# ----------------------------------------------------------------------------- result tables

def pct(value):
    return MISSING if value is None else f"{100 * value:.1f}"


def _mean_or_none(values):
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def md_row(cells):
    return "| " + " | ".join(cells) + " |"


def depth_notes(metric, limits, tasks):
    """Sentences on the ranking lengths below `metric`'s cut-off; `limits`: (what, depth, its tasks)
    triples, e.g. ("ZeroGR decoded at most K=10 DocIDs per query", 10, ["SciFact"])."""
    measure = MEASURES.get(metric)
    cutoff = measure.params.get("cutoff") if measure is not None else None
    notes = []
    for what, depth, on in limits:
        if cutoff and depth < cutoff and set(on) & set(tasks):
            where = "" if set(tasks) <= set(on) else f" on {', '.join(t for t in tasks if t in on)}"
            notes.append(f"{metric} counts up to {cutoff} ranks, but {what}{where}.")
    return notes


def results_table(results, task_domain, acc1, mair_average, beir_tasks=(), metric="Acc@1", methods=None,
                  limits=()):
    """Markdown table of `metric` x100: one row per method, one column per task, then per-domain
    averages, "MAIR avg" over the non-BEIR tasks (`mair_average`: "domains", the mean of the domain
    averages, or "tasks", the mean over the tasks) and "BEIR avg" (nDCG@10 over the `beir_tasks` present).

    `results`: {task: {method: aggregate dict}} (metrics.evaluate's); `task_domain`: {task: domain}
    (for non-BEIR tasks); `acc1`: the definition of Acc@1 (ACC1_DEFINITIONS). An average over a
    task a method lacks is left empty. A note under the table names the definitions; `limits`:
    ranking-length limits, noted under the table where below the metric's cut-off (see depth_notes).
    """
    if mair_average not in MAIR_AVERAGES:
        raise ValueError(f"results_table: MAIR average {mair_average!r} is not one of {list(MAIR_AVERAGES)}")
    results = {t: {m: with_acc1(values, acc1) for m, values in by_method.items()} for t, by_method in results.items()}
    beir_set = set(beir_tasks) | {t for t in results if task_domain.get(t) == mair_config.BEIR_DOMAIN}
    beir = [t for t in results if t in beir_set]
    mair = [t for t in results if t not in beir_set]
    missing = [t for t in mair if t not in task_domain]
    if missing:
        raise KeyError(f"results_table: no domain for task(s) {missing}")
    others = list(dict.fromkeys(task_domain[t] for t in mair if task_domain[t] not in mair_config.DOMAINS))
    in_mair = [t for t in mair if task_domain[t] not in others]  # custom domains: columns, not the MAIR avg
    rank = {d: i for i, d in enumerate(mair_config.DOMAINS)}
    domains = sorted(dict.fromkeys(task_domain[t] for t in mair), key=lambda d: rank.get(d, len(rank)))
    by_domain = {d: [t for t in mair if task_domain[t] == d] for d in domains}
    tasks = [t for d in domains for t in by_domain[d]] + beir
    methods = list(methods or dict.fromkeys(m for t in results for m in results[t]))

    def value(task, method, name):
        return results[task].get(method, {}).get(name)

    header = ["Method", *tasks, *(f"{d} avg" for d in domains)]
    header += [f"MAIR avg ({metric})"] if in_mair else []
    header += [f"BEIR avg ({BEIR_METRIC})"] if beir else []
    lines = [md_row(header), md_row(["---"] + ["---:"] * (len(header) - 1))]
    for method in methods:
        domain_avgs = [_mean_or_none([value(t, method, metric) for t in by_domain[d]]) for d in domains]
        cells = [value(t, method, metric) for t in tasks] + domain_avgs
        if mair_average == "domains":
            cells += [_mean_or_none([a for d, a in zip(domains, domain_avgs) if d not in others])] if in_mair else []
        else:
            cells += [_mean_or_none([value(t, method, metric) for t in in_mair])] if in_mair else []
        cells += [_mean_or_none([value(t, method, BEIR_METRIC) for t in beir])] if beir else []
        lines.append(md_row([method] + [pct(c) for c in cells]))
    note = f"{metric} x100."
    if metric == "Acc@1":
        note += " " + ACC1_DEFINITIONS[acc1][1]
    note += " Domain avg: mean over the domain's tasks." + (" " + MAIR_AVERAGES[mair_average] if in_mair else "")
    if others:
        note += f" Not in the MAIR avg (not MAIR domains): {', '.join(others)}."
    if beir:
        note += f" BEIR avg: mean {BEIR_METRIC} over {', '.join(beir)}."
    depth = "".join(f"\n{n}\n" for n in depth_notes(metric, limits, tasks))
    return "\n".join(lines) + f"\n\n{note} {MISSING}: missing result.\n{depth}"


def results_tables(results, task_domain, acc1, mair_average, beir_tasks=(), metrics=TABLE_METRICS, methods=None,
                   limits=()):
    """One `results_table` per metric under a `## <metric>` heading (Acc@1, nDCG@10, R@100 by default)."""
    return "\n".join(f"## {metric}\n\n"
                     f"{results_table(results, task_domain, acc1, mair_average, beir_tasks, metric, methods, limits)}"
                     for metric in metrics)


# ----------------------------------------------------------------------------- ablation statistics

STAT_CHUNK_CELLS = 2 ** 22    # resamples x queries drawn at once (bounds memory)
TIE_TOL = 1e-12               # |mean difference| this close to the observed one counts as reaching it


def bootstrap_ci(values, n_resamples=1000, alpha=0.05, seed=0):
    """(mean, low, high): percentile bootstrap CI of the mean, resampling queries with replacement."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_ci: no values")
    rng = np.random.default_rng(seed)
    n, chunk = values.size, max(1, STAT_CHUNK_CELLS // values.size)
    means = np.concatenate([values[rng.integers(0, n, size=(min(chunk, n_resamples - s), n))].mean(axis=1)
                            for s in range(0, n_resamples, chunk)])
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(values.mean()), float(low), float(high)


def _paired(a, b):
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if set(a) != set(b):
            raise ValueError(f"paired_test: the two methods cover different queries ({len(a)} vs {len(b)})")
        keys = sorted(a)
        a, b = [a[k] for k in keys], [b[k] for k in keys]
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_test: need two equal-length, non-empty samples, got {a.shape} and {b.shape}")
    return a, b


def paired_test(a, b, n_resamples=10000, seed=0):
    """Two-sided p-value of a paired randomization (sign-flip) test of mean(a - b) = 0.

    `a`, `b`: per-query values, as aligned sequences or {qid: value} over the same qids. Under the
    null each query's difference is equally likely to have either sign; p is the share of random
    sign assignments whose |mean difference| reaches the observed one, counting the observed
    assignment: (1 + hits) / (1 + n_resamples). Identical inputs give p = 1.
    """
    a, b = _paired(a, b)
    diff = a - b
    observed = abs(diff.mean())
    rng = np.random.default_rng(seed)
    chunk, hits = max(1, STAT_CHUNK_CELLS // diff.size), 0
    for start in range(0, n_resamples, chunk):
        signs = rng.integers(0, 2, size=(min(chunk, n_resamples - start), diff.size)) * 2.0 - 1.0
        hits += int(np.sum(np.abs(signs @ diff) / diff.size >= observed - TIE_TOL))
    return (1 + hits) / (1 + n_resamples)


def holm(p_values):
    """Holm step-down adjusted p-values, in the order given."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate(np.minimum(1.0, (p.size - np.arange(p.size)) * p[order]))
    out = np.empty_like(p)
    out[order] = adjusted
    return out


def _aligned(per_query_by_method, metrics):
    """(n_queries, {method: {metric: values}}) with every method and metric over the same qids."""
    qids = None
    for method, by_metric in per_query_by_method.items():
        for metric in metrics:
            if metric not in by_metric:
                raise KeyError(f"ablation: method '{method}' has no per-query '{metric}'")
            if qids is None:
                qids = sorted(by_metric[metric])
            elif set(by_metric[metric]) != set(qids):
                raise ValueError(f"ablation: method '{method}' {metric} covers {len(by_metric[metric])} "
                                 f"queries, not the same {len(qids)} as the others")
    if not qids:
        raise ValueError("ablation: no per-query values")
    arrays = {m: {k: np.array([v[k][q] for q in qids], dtype=float) for k in metrics}
              for m, v in per_query_by_method.items()}
    return len(qids), arrays


def _p_text(p):
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def ablation_table(per_query_by_method, reference="reverse_annealed", metrics=TABLE_METRICS, alpha=0.05,
                   n_boot=1000, n_perm=10000, seed=0):
    """Markdown table of a decoding ablation with CIs, paired tests against `reference` and a verdict.

    `per_query_by_method`: {method: {metric: {qid: value}}}, all over the same queries. Each cell is
    the mean with its 95% bootstrap CI (x100); each Δ cell is method - reference (x100) with the
    Holm-adjusted p-value over all method x metric comparisons, `*` when below `alpha`. The closing
    line says plainly whether anything differs significantly, so the table never ranks noise.
    """
    if reference not in per_query_by_method:
        raise KeyError(f"ablation: reference method '{reference}' not in {list(per_query_by_method)}")
    n_queries, arrays = _aligned(per_query_by_method, metrics)
    methods = [reference] + [m for m in per_query_by_method if m != reference]
    keys = [(m, k) for m in methods[1:] for k in metrics]
    raw = [paired_test(arrays[m][k], arrays[reference][k], n_perm, seed) for m, k in keys]
    p_holm = dict(zip(keys, holm(raw))) if keys else {}
    diff = {(m, k): arrays[m][k].mean() - arrays[reference][k].mean() for m, k in keys}

    header = ["Method", *metrics, *(f"Δ {k}" for k in metrics)]
    lines = [md_row(header), md_row(["---"] + ["---:"] * (len(header) - 1))]
    for m in methods:
        cells = [f"{m} (ref)" if m == reference else m]
        for k in metrics:
            mean, low, high = bootstrap_ci(arrays[m][k], n_boot, 0.05, seed)
            cells.append(f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]")
        for k in metrics:
            if m == reference:
                cells.append("")
            else:
                star = "*" if p_holm[m, k] < alpha else ""
                cells.append(f"{100 * diff[m, k]:+.1f} ({_p_text(p_holm[m, k])}){star}")
        lines.append(md_row(cells))

    note = (f"Mean [95% percentile-bootstrap CI over queries, {n_boot} resamples] x100 on {n_queries} "
            f"queries. Δ: method - {reference}; p: two-sided paired sign-flip randomization test on "
            f"per-query differences ({n_perm} resamples), Holm-adjusted over {len(keys)} comparisons; "
            f"*: p < {alpha}.")
    significant = [key for key in keys if p_holm[key] < alpha]
    if not keys:
        verdict = f"Only {reference}: nothing to compare."
    elif not significant:
        verdict = (f"No method differs significantly from {reference} at alpha={alpha} (Holm) on "
                   f"{n_queries} queries: the differences are within noise.")
    else:
        found = "; ".join(f"{m} on {k} ({100 * diff[m, k]:+.1f}, {_p_text(p_holm[m, k])})"
                          for m, k in significant)
        verdict = (f"Significant differences from {reference} at alpha={alpha} (Holm) on {n_queries} "
                   f"queries: {found}.")
        if len(significant) < len(keys):
            verdict += " All other differences are within noise."
    return "\n".join(lines) + f"\n\n{note}\n\n{verdict}\n"


# ----------------------------------------------------------------------------- plots

PLOT_DPI = 120


def _save(fig, path):
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    log.info("plot -> %s", path)


def plot_ablation(per_query_by_method, path, metrics=TABLE_METRICS, n_boot=1000, seed=0):
    """Grouped bar chart (PNG): one group per metric, one bar per method, 95% bootstrap CI error bars."""
    n_queries, arrays = _aligned(per_query_by_method, metrics)
    methods = list(per_query_by_method)
    from matplotlib.figure import Figure  # imported here: plotting is the only user

    fig = Figure(figsize=(1.6 + 1.2 * len(metrics) * max(1, len(methods) / 2), 3.6))
    ax = fig.subplots()
    width = 0.8 / len(methods)
    x = np.arange(len(metrics))
    for i, m in enumerate(methods):
        stats = np.array([bootstrap_ci(arrays[m][k], n_boot, 0.05, seed) for k in metrics]) * 100
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, stats[:, 0], width, label=m,
               yerr=[stats[:, 0] - stats[:, 1], stats[:, 2] - stats[:, 0]], capsize=3)
    ax.set_xticks(x, list(metrics))
    ax.set_ylabel("score x100")
    ax.set_title(f"Decoding ablation: mean and 95% bootstrap CI over {n_queries} queries", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_schedule(temperatures, path):
    """Line plot (PNG) of a decoding temperature schedule: temperature per iteration (DocID rank)."""
    temperatures = list(temperatures)
    if not temperatures:
        raise ValueError("plot_schedule: no temperatures")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.plot(range(len(temperatures)), temperatures, marker=".", markersize=3)
    ax.set_xlabel("iteration i (rank of the decoded DocID)")
    ax.set_ylabel("temperature $t_i$")
    ax.set_title("Reverse-annealed temperature schedule", fontsize=9)
    ax.grid(alpha=0.3)
    _save(fig, path)
