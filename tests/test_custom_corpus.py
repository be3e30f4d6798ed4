"""A user's own corpus in the MAIR layout, not in mair_config, runs through the scripts: the task
helpers accept it (domain from task.json, else Custom), its domain gets a column but stays out of
the MAIR average, and its bad input is named."""
import json
import logging
import os

import pytest

import data
import genir
import mair_config as mc
import metrics
import sft
import sftid
import sftqg
from file_io import DataError, read_jsonl, write_jsonl

TASK = "MyDocs"
DOCS = [{"id": "a1", "doc": "How to reset the router: hold the button ten seconds."},
        {"id": "a2", "doc": "Billing: invoices are sent on the first day of the month."}]
QUERIES = [{"qid": "1", "instruction": "Find the help article.", "query": "router reset",
            "labels": [{"id": "a1", "score": 1}]},
           {"qid": "2", "instruction": "Find the help article.", "query": "when do invoices come",
            "labels": [{"id": "a2", "score": 1}]}]


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A data root holding the custom task, made the default root (as $ZEROGR_DATA would)."""
    root = str(tmp_path / "data")
    write_jsonl(DOCS, mc.docs_path(TASK, root))
    write_jsonl(QUERIES, mc.queries_path(TASK, root))
    monkeypatch.setattr(mc, "DATA_ROOT", root)
    return root


def test_task_helpers_accept_a_custom_task(root):
    assert mc.check_task(TASK) == mc.check_task(TASK, root) == TASK
    assert mc.task_domain(TASK) == mc.CUSTOM_DOMAIN
    assert mc.corpus_of(TASK) == TASK and mc.tasks_of_corpus(TASK) == [TASK]
    assert mc.corpora_of([TASK, "SciFact", TASK]) == [TASK, "SciFact"]
    assert mc.corpus_docs_path(TASK, root) == mc.docs_path(TASK, root)
    assert mc.task_domain("SciFact") == "Academic"      # the registry still wins


def test_task_json_names_the_domain(root):
    path = mc.task_file(TASK, root)
    with open(path, "w") as f:
        json.dump({"domain": "Support"}, f)
    assert mc.task_domain(TASK) == "Support"
    with open(path, "w") as f:
        json.dump({"domain": "Coding"}, f)
    assert mc.task_domain(TASK) == "Code"                # a paper domain name maps to ours
    with open(path, "w") as f:
        json.dump({"name": "x"}, f)
    with pytest.raises(DataError, match=rf"{path}: expected {{\"domain\": \"<name>\"}}"):
        mc.task_domain(TASK)


def test_unknown_names_absent_on_disk_still_get_suggestions(root):
    with pytest.raises(mc.UnknownTaskError, match=r"unknown task 'SciFacts' .*no .*MAIR-Docs/SciFacts/docs\.jsonl.*"
                                                  r"did you mean SciFact"):
        mc.corpus_of("SciFacts")
    for name in ("../MAIR-Docs/MyDocs", "MAIR-Docs/MyDocs", "", "."):
        with pytest.raises(mc.UnknownTaskError):
            mc.check_task(name)
    os.remove(mc.docs_path(TASK, root))                  # queries alone do not make a task
    with pytest.raises(mc.UnknownTaskError):
        mc.task_domain(TASK)


def test_custom_domains_have_a_column_but_stay_out_of_the_mair_average(root):
    results = {TASK: {"m": {"Acc@1": 1.0}}, "SciFact": {"m": {"Acc@1": 0.2}}, "FinQA": {"m": {"Acc@1": 0.4}}}
    domains = {t: mc.task_domain(t) for t in results}
    for average in ("domains", "tasks"):
        table = metrics.results_table(results, domains, "p@1", average)
        header, row = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[:3:2]]
        cells = dict(zip(header, row))
        assert cells["Custom avg"] == "100.0" and cells["MAIR avg (Acc@1)"] == "30.0"
        assert "Not in the MAIR avg (not MAIR domains): Custom" in table
    only_custom = metrics.results_table({TASK: results[TASK]}, domains, "p@1", "domains")
    assert "MAIR avg" not in only_custom.splitlines()[0]


def test_scripts_take_the_custom_task(root, tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(sft, "run_sft", lambda base, out, settings, encode, desc: trained.append(desc))
    for script in (sftqg, sftid):
        monkeypatch.setattr(script, "C", dict(script.C))
        script.main([f"--SFT_DATA={tmp_path / script.__name__}.jsonl", f"--TRAIN_TASKS={TASK}", f"--DATA_ROOT={root}"])
    assert trained == ["sftqg", "sftid"]
    qg = read_jsonl(str(tmp_path / "sftqg.jsonl"))
    assert [(r["query"], r["source"]) for r in qg] == [("router reset", TASK), ("when do invoices come", TASK)]
    assert len(read_jsonl(str(tmp_path / "sftid.jsonl"))) == 2
    monkeypatch.setattr(genir, "C", dict(genir.C))
    assert genir.main([f"--TASKS={TASK}", "--STAGE=table", f"--OUT_DIR={tmp_path / 'out'}",
                       f"--DATA_ROOT={root}"]) == 0


def test_custom_corpus_duplicate_ids_and_empty_documents_are_named(root, caplog):
    path = mc.docs_path(TASK, root)
    write_jsonl(DOCS + [{"id": "a3", "doc": "  "}], path)
    with caplog.at_level(logging.WARNING, logger="data"):
        assert len(data.read_docs(path)) == 3
    assert f"{path}: 1 document(s) with empty text, e.g. a3 (line 3)" in caplog.text
    with open(path, "a") as f:
        f.write("\n" + json.dumps({"id": "a1", "doc": "again"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:5: duplicate document id 'a1' \(first on line 1\)"):
        data.read_docs(path)
    with pytest.raises(DataError, match="duplicate document id 'a1'"):
        data.query_sft_rows([TASK], root)
