"""What a run writes besides its runs and metrics: results.md (the paper-style tables of the finished
tasks, with notes and warnings; the same results as a wandb table when wandb is on), the decoding
ablation's table and plots, and failures.json (the failures that still stand)."""
import logging
import os

import mair_config
import metrics
import quality
import sft
from file_io import atomic_open, read_json, write_json

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
    text += generator_section(found)
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
