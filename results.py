"""What a run writes besides its runs and metrics: results.md (the paper-style tables of the finished
tasks, with the per-epoch figures, notes and warnings; the same results as a wandb table when wandb
is on), each task's epochs.json, the decoding ablation's table and plots, the schedule sweep's table,
and failures.json (the failures that still stand)."""
import logging
import os

import mair_config
import metrics
import quality
import sft
from config import env_rank
from file_io import DataError, atomic_open, read_json, write_json

log = logging.getLogger("results")


def finished_results(run_dir, tasks):
    """{task: its metrics.json} for the tasks of `tasks` evaluated under `run_dir`."""
    found = {}
    for task in tasks:
        path = os.path.join(run_dir, task, "metrics.json")
        if os.path.exists(path):
            found[task] = read_json(path)
    return found


def ranking_limits(found):
    """(what, depth, tasks) of each limit on the ranking lengths of finished tasks (see metrics.depth_notes)."""
    limits = {}
    for task, r in found.items():
        s = r["settings"]
        greedy = s["DECODE_MODE"] == "greedy"
        what = "ZeroGR decoded one DocID per query (greedy)" if greedy else \
            f"ZeroGR decoded at most K={s['K']} DocIDs per query"
        limits.setdefault((what, 1 if greedy else s["K"]), []).append(task)
        limits.setdefault((f"every method returned at most MAX_RESULTS={s['MAX_RESULTS']} documents per query",
                           s["MAX_RESULTS"]), []).append(task)
    return [(what, depth, tasks) for (what, depth), tasks in limits.items()]


def write_runs(folder, runs):
    """One TREC run file per method ({name: {qid: ranked doc ids}}) in a task's folder."""
    for name, rankings in runs.items():
        metrics.write_trec_run(metrics.run_from_rankings(rankings), os.path.join(folder, f"{name}.run"), name)


def generator_section(found):
    """results.md's table of the generator figures (quality.py) of each evaluated corpus, once each."""
    rows = {}
    for r in found.values():
        g = r.get("generator_quality") or {}
        if g.get("queries") or g.get("docids"):
            rows.setdefault(r["corpus"], ((r["corpus"],), g.get("queries"), g.get("docids")))
    if not rows:
        return ""
    return ("\n## Generator quality\n\nPseudo-queries and DocIDs of the documents scored by qg_vllm.py / "
            "title_vllm.py (QUALITY_DOCS; see README, Generator quality).\n\n"
            + quality.table(list(rows.values()), ["corpus"]))


def record_epoch(folder, epoch, methods):
    """Add epoch `epoch`'s metrics ({method: metrics}) to a task's `folder`/epochs.json, keeping the other epochs'."""
    path = os.path.join(folder, "epochs.json")
    found = read_json(path) if os.path.exists(path) else {}
    found[str(epoch)] = methods
    write_json(dict(sorted(found.items(), key=lambda item: int(item[0]))), path)


def epoch_section(run_dir, found, acc1, method="ZeroGR"):
    """results.md's table of `method`'s Acc@1 after each training epoch of the finished tasks that have an
    epochs.json (the final epoch's from metrics.json, the best epoch of each task in bold), or ""."""
    by_task, finals = {}, set()
    for task, r in found.items():
        path = os.path.join(run_dir, task, "epochs.json")
        if os.path.exists(path):
            epochs = {int(e): metrics.with_acc1(m[method], acc1)["Acc@1"] for e, m in read_json(path).items()
                      if method in m}
            final = r.get("epochs", max(epochs, default=0) + 1)
            epochs[final] = metrics.with_acc1(r["methods"][method], acc1)["Acc@1"]
            by_task[task] = epochs
            finals.add(final)
    if not by_task:
        return ""
    lines = [metrics.md_row(["Epoch", *by_task]), metrics.md_row(["---"] + ["---:"] * len(by_task))]
    best = {t: max(v, key=lambda e: (v[e] or 0.0, e)) for t, v in by_task.items()}  # a tie: the later epoch
    for epoch in sorted({e for v in by_task.values() for e in v}):
        cells = [metrics.pct(v.get(epoch)) if epoch != best[t] else f"**{metrics.pct(v[epoch])}**"
                 for t, v in by_task.items()]
        lines.append(metrics.md_row([f"{epoch} (final)" if epoch in finals else str(epoch), *cells]))
    return (f"\n## {method} per epoch\n\nAcc@1 x100 of {method} after each training epoch (EVAL_EVERY_EPOCH). "
            "The tables above report the final epoch. Bold: each task's best epoch, chosen on these test queries, "
            f"so not a fair held-out figure. {metrics.ACC1_DEFINITIONS[acc1][1]}\n\n" + "\n".join(lines) + "\n")


def write_results(run_dir, tasks, run_name, methods, acc1, mair_average, wandb_setting=None, wandb_project="zerogr"):
    """Write `run_dir`/results.md from the finished tasks (and log them to wandb); its path, or None.
    `acc1`, `mair_average`: the tables' definitions of Acc@1 and of the MAIR average
    (metrics.ACC1_DEFINITIONS, metrics.MAIR_AVERAGES), named under each table."""
    found = finished_results(run_dir, tasks)
    if not found:
        log.warning("no finished task to tabulate under %s", run_dir)
        return None
    table = metrics.results_tables({t: r["methods"] for t, r in found.items()},
                                   {t: r["domain"] for t, r in found.items()}, acc1, mair_average,
                                   mair_config.BEIR_TASKS, methods=methods, limits=ranking_limits(found))
    notes = [w for r in found.values() for w in r.get("warnings", [])]
    missing = [t for t in tasks if t not in found]
    text = f"# Results: {run_name}\n\n{table}\n"
    if missing:
        text += f"\nNot finished: {', '.join(missing)}\n"
    text += epoch_section(run_dir, found, acc1) + generator_section(found)
    if notes:
        text += "\n## Warnings\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    path = os.path.join(run_dir, "results.md")
    with atomic_open(path) as f:
        f.write(text)
    log_wandb_tables(found, run_dir, run_name, acc1, wandb_setting, wandb_project)
    log.info("results table -> %s", path)
    return path


def log_wandb_tables(found, run_dir, run_name, acc1, wandb_setting, wandb_project):
    run = sft.wandb_run(wandb_setting, wandb_project, f"{run_name}-results", run_dir)
    if run is None:
        return
    import wandb
    columns = ["task", "domain", "method"] + list(metrics.MEASURES)
    rows = [[t, r["domain"], m] + [metrics.with_acc1(vals, acc1).get(k) for k in metrics.MEASURES]
            for t, r in found.items() for m, vals in r["methods"].items()]
    run.log({"results": wandb.Table(columns=columns, data=rows)})
    run.finish()


def write_ablation(run_dir, run_name, tasks, per_query, reference, settings, schedule, acc1):
    """Write the decoding ablation of `tasks` under `run_dir`: ablation.md (metrics.ablation_table of
    `per_query` {mode: {metric: {query: value}}, as metrics.evaluate gives them} against the mode
    `reference`, under `settings`, a text; Acc@1 as defined by `acc1`, metrics.ACC1_DEFINITIONS, named
    under the table), ablation_per_query.json, ablation.png and schedule.png (`schedule`: the
    temperatures per iteration); the path of ablation.md."""
    per_query = {mode: metrics.with_acc1(values, acc1) for mode, values in per_query.items()}
    table = metrics.ablation_table(per_query, reference=reference) + f"\n{metrics.ACC1_DEFINITIONS[acc1][1]}\n"
    path = os.path.join(run_dir, "ablation.md")
    with atomic_open(path) as f:
        f.write(f"# Decoding ablation: {run_name} ({', '.join(tasks)})\n\nSettings: {settings}.\n\n{table}\n")
    write_json(per_query, os.path.join(run_dir, "ablation_per_query.json"))
    metrics.plot_ablation(per_query, os.path.join(run_dir, "ablation.png"))
    metrics.plot_schedule(schedule, os.path.join(run_dir, "schedule.png"))
    log.info("ablation -> %s, ablation.png, schedule.png", path)
    return path


def cached_run(path, write, make):
    """The TREC run at `path` if there (finished by an earlier call), else `make()`, written there when `write`
    (its file name, less .run, the tag)."""
    if os.path.exists(path):
        return metrics.read_trec_run(path)
    run = make()
    if write:
        metrics.write_trec_run(run, path, os.path.basename(path)[:-len(".run")])
    return run


def settings_text(s):
    """The decoding settings `s` (decoding.DecodeSettings) the ablation and the sweep name above their table."""
    return (f"K={s.K}, k={s.slope}, m={s.midpoint}, T_max={s.t_max}, top-k={s.top_k}, top-p={s.top_p}, "
            f"nucleus T={s.nucleus_temperature}, beams={s.num_beams or s.K}")


def pooled(by_task):
    """{name: {metric: {"<task>/<qid>": value}}} from {name: {task: {metric: {qid: value}}}}."""
    return {name: {metric: {f"{task}/{qid}": v for task, values in tasks.items() for qid, v in values[metric].items()}
                   for metric in metrics.MEASURES} for name, tasks in by_task.items()}


def write_sweep(run_dir, run_name, rows, settings, acc1):
    """Write `run_dir`/sweep.md and sweep.json from `rows`: (parameter, value, whether it is the default,
    {task: {metric: {qid: value}}}) each; per row the Acc@1 of each task and, averaged over the tasks, Acc@1,
    nDCG@10 and R@100 (Acc@1 as `acc1` defines it); `settings`, a text, above the table. The path of sweep.md."""
    tasks = list(dict.fromkeys(t for *_, by_task in rows for t in by_task))
    averaged = ("Acc@1", "nDCG@10", "R@100")
    header = ["Parameter", "Value", *tasks, *(f"{m} avg" for m in averaged)]
    lines = [metrics.md_row(header), metrics.md_row(["---"] + ["---:"] * (len(header) - 1))]
    stored = []
    for parameter, value, default, by_task in rows:
        means = {t: {m: sum(v.values()) / len(v) for m, v in per_query.items()} for t, per_query in by_task.items()}
        shown = {t: metrics.with_acc1(v, acc1) for t, v in means.items()}
        avg = {m: sum(shown[t][m] for t in tasks) / len(tasks) for m in averaged}
        cells = [metrics.pct(shown[t]["Acc@1"]) for t in tasks] + [metrics.pct(avg[m]) for m in averaged]
        lines.append(metrics.md_row([parameter, f"{value} (default)" if default else str(value), *cells]))
        stored.append({"parameter": parameter, "value": value, "default": default, "tasks": means, "average": avg})
    path = os.path.join(run_dir, "sweep.md")
    with atomic_open(path) as f:
        f.write(f"# Schedule sweep: {run_name} ({', '.join(tasks)})\n\nSettings: {settings}. Each row changes one "
                f"parameter of the reverse-annealed schedule; the others keep their default.\n\n" + "\n".join(lines)
                + f"\n\nAcc@1 per task, and averages over the tasks, x100. {metrics.ACC1_DEFINITIONS[acc1][1]}\n")
    write_json({"settings": settings, "rows": stored}, os.path.join(run_dir, "sweep.json"))
    log.info("sweep -> %s", path)
    return path


def record_failure(failures, name, step, error):
    """One corpus or task failing does not stop the others; under a multi-process launch only bad data
    (met by every rank alike) is skipped: another error ends this rank and the launcher stops the rest."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not isinstance(error, DataError):
        log.error("rank %d: %s %s failed; stopping this launch (rerun to resume)", env_rank(), name, step)
        raise error
    log.exception("%s: %s failed", name, step)
    failures[name] = f"{step}: {type(error).__name__}: {error}"


def write_failures(run_dir, stage, failures):
    """Keep `run_dir`/failures.json to the failures that still stand: this run's `failures` ({corpus or
    task: "<step>: <error>"}), and those of an earlier run in a step (training, evaluation) this run,
    of STAGE `stage`, did not retry; removed when none is left."""
    path = os.path.join(run_dir, "failures.json")
    not_retried = {"all": (), "train": ("evaluation",), "eval": ("training",)}[stage]
    try:
        earlier = dict(read_json(path)) if os.path.exists(path) else {}
    except (TypeError, ValueError) as e:
        log.warning("%s: unreadable (%s); rewritten", path, e)
        earlier = {}
    standing = {**{n: v for n, v in earlier.items() if str(v).startswith(not_retried)}, **failures}
    if failures:
        log.error("failed: %s (see %s)", ", ".join(failures), path)
    if standing:
        write_json(standing, path)
    elif os.path.exists(path):
        os.remove(path)
        log.info("no failure left: removed %s", path)
