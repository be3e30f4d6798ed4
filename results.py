"""results.md: the paper-style tables of the finished tasks of a run, with notes and warnings,
and the same results as a wandb table when wandb is on."""
import logging
import os

import lm
import mair_config
import metrics
from file_io import atomic_open, read_json

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


def write_results(run_dir, tasks, run_name, methods, wandb_setting=None, wandb_project="zerogr"):
    """Write `run_dir`/results.md from the finished tasks (and log them to wandb); its path, or None."""
    found = finished_results(run_dir, tasks)
    if not found:
        log.warning("no finished task to tabulate under %s", run_dir)
        return None
    table = metrics.results_tables({t: r["methods"] for t, r in found.items()},
                                   {t: r["domain"] for t, r in found.items()}, mair_config.BEIR_TASKS,
                                   methods=methods, limits=ranking_limits(found))
    notes = [w for r in found.values() for w in r.get("warnings", [])]
    missing = [t for t in tasks if t not in found]
    text = f"# Results: {run_name}\n\n{table}\n"
    if missing:
        text += f"\nNot finished: {', '.join(missing)}\n"
    if notes:
        text += "\n## Warnings\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    path = os.path.join(run_dir, "results.md")
    with atomic_open(path) as f:
        f.write(text)
    log_wandb_tables(found, run_dir, run_name, wandb_setting, wandb_project)
    log.info("results table -> %s", path)
    return path


def log_wandb_tables(found, run_dir, run_name, wandb_setting, wandb_project):
    run = lm.wandb_run(wandb_setting, wandb_project, f"{run_name}-results", run_dir)
    if run is None:
        return
    import wandb
    columns = ["task", "domain", "method"] + list(metrics.MEASURES)
    rows = [[t, r["domain"], m] + [vals.get(k) for k in metrics.MEASURES]
            for t, r in found.items() for m, vals in r["methods"].items()]
    run.log({"results": wandb.Table(columns=columns, data=rows)})
    run.finish()
