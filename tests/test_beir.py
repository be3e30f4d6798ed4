"""dataset/beir.py brings a BEIR dataset into the MAIR layout as a registered evaluation task
(offline: a small BEIR-format fixture; the hub loader replaced)."""
import json
import logging
import os

import pytest

import data
import mair_config as mc
import metrics
from dataset import beir
from file_io import DataError, read_jsonl, write_jsonl

CORPUS = [{"_id": "d1", "title": "Aspirin", "text": "Aspirin thins the blood.", "metadata": {}},
          {"_id": "d2", "title": "", "text": "Statins lower cholesterol.", "metadata": {}},
          {"_id": "d3", "title": "Unjudged", "text": "Never in the qrels.", "metadata": {}},
          {"_id": "d4", "title": "", "text": " ", "metadata": {}}]
QUERIES = [{"_id": "q9", "text": "a training query", "metadata": {}},
           {"_id": "q1", "text": "does aspirin thin the blood", "metadata": {}},
           {"_id": "q2", "text": "statins and cholesterol", "metadata": {}}]
TEST_QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\nq2\td2\t1\nq2\tgone\t1\n"


def beir_folder(root, name="scifact", corpus=CORPUS, qrels=TEST_QRELS):
    folder = root / name
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(corpus, str(folder / "corpus.jsonl"))
    write_jsonl(QUERIES, str(folder / "queries.jsonl"))
    (folder / "qrels" / "test.tsv").write_text(qrels)
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq9\td3\t1\n")
    return str(folder)


def test_beir_folder_becomes_a_registered_evaluation_task(tmp_path, caplog):
    root, folder = str(tmp_path / "data"), beir_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        beir.main([folder, "--root", root])
    task = "BEIR-scifact"
    assert read_jsonl(mc.docs_path(task, root)) == [
        {"id": "d1", "doc": "Aspirin Aspirin thins the blood."}, {"id": "d2", "doc": "Statins lower cholesterol."},
        {"id": "d3", "doc": "Unjudged Never in the qrels."}, {"id": "d4", "doc": ""}]
    instruction = beir.INSTRUCTIONS["scifact"]
    assert read_jsonl(mc.queries_path(task, root)) == [   # test-qrels queries only, every judged label
        {"qid": "q1", "instruction": instruction, "query": "does aspirin thin the blood",
         "labels": [{"id": "d1", "score": 2}, {"id": "d2", "score": 0}]},
        {"qid": "q2", "instruction": instruction, "query": "statins and cholesterol",
         "labels": [{"id": "d2", "score": 1}, {"id": "gone", "score": 1}]}]
    assert json.load(open(mc.task_file(task, root)))["domain"] == "BEIR"
    assert "1 document(s) with empty text" in caplog.text and "corpus.jsonl:4" in caplog.text
    assert "1 of 3 judged documents are not in the corpus" in caplog.text
    # registered: every script's task helpers accept it, and the evaluation reader reads it
    assert mc.check_task(task, root) == task and mc.task_domain(task, root) == mc.BEIR_DOMAIN
    assert mc.corpus_of(task, root) == task and mc.corpus_docs_path(task, root) == mc.docs_path(task, root)
    docs = data.read_docs(mc.docs_path(task, root))
    queries, qrels, _ = data.eval_queries(mc.queries_path(task, root), {d["id"] for d in docs}, True)
    assert qrels == {"q1": {"d1": 2, "d2": 0}, "q2": {"d2": 1, "gone": 1}} and len(queries) == 2


def test_rerun_skips_and_overwrite_redoes(tmp_path):
    root, folder = str(tmp_path / "data"), beir_folder(tmp_path)
    beir.main([folder, "--root", root, "--task", "SF"])
    stamp = os.stat(mc.docs_path("SF", root)).st_mtime_ns
    assert beir.convert(beir.open_source(folder), "SF", "x", root) == []
    assert os.stat(mc.docs_path("SF", root)).st_mtime_ns == stamp
    beir.main([folder, "--root", root, "--task", "SF", "--overwrite", "--instruction", "Find it."])
    assert {q["instruction"] for q in read_jsonl(mc.queries_path("SF", root))} == {"Find it."}


def test_instruction_comes_from_mair_copy_when_on_disk(tmp_path):
    root = str(tmp_path / "data")
    assert beir.instruction_for("scifact", root) == beir.INSTRUCTIONS["scifact"]
    write_jsonl([{"qid": "1", "instruction": "MAIR's SciFact instruction.", "query": "q", "labels": []}],
                mc.queries_path("SciFact", root))
    assert beir.instruction_for("scifact", root) == "MAIR's SciFact instruction."
    assert beir.instruction_for("scifact", root, "Mine.") == "Mine."
    with pytest.raises(DataError, match="android: no instruction: add a line for it to INSTRUCTIONS"):
        beir.instruction_for("android", root)


def test_hub_dataset_streams_the_published_files(tmp_path, monkeypatch):
    base = "hf://datasets/BeIR/nfcorpus"
    qrels = [{"query-id": "q1", "corpus-id": "d1", "score": 1}]
    files = {f"{base}/corpus.jsonl.gz": CORPUS, f"{base}/queries.jsonl.gz": QUERIES, f"{base}-qrels/test.tsv": qrels}
    monkeypatch.setattr(beir, "load_rows", lambda spec: iter(files[spec["data_files"]]))
    root = str(tmp_path / "data")
    beir.main(["nfcorpus", "--root", root])
    assert [q["qid"] for q in read_jsonl(mc.queries_path("BEIR-nfcorpus", root))] == ["q1"]
    assert len(read_jsonl(mc.docs_path("BEIR-nfcorpus", root))) == 4
    assert json.load(open(mc.task_file("BEIR-nfcorpus", root)))["qrels"] == f"{base}-qrels/test.tsv"


def test_bad_beir_input_is_named_and_registers_nothing(tmp_path):
    root = str(tmp_path / "data")
    dup = beir_folder(tmp_path / "a", corpus=CORPUS + [dict(CORPUS[0], text="again")])
    with pytest.raises(DataError, match=r"corpus\.jsonl:5: duplicate document id 'd1' \(first at .*corpus\.jsonl:1\)"):
        beir.main([dup, "--root", root])
    assert not os.path.exists(mc.docs_path("BEIR-scifact", root))
    with pytest.raises(mc.UnknownTaskError):
        mc.check_task("BEIR-scifact", root)
    no_test = beir_folder(tmp_path / "b")
    os.remove(os.path.join(no_test, "qrels", "test.tsv"))
    with pytest.raises(DataError, match=r"qrels/test\.tsv: no such file, so no 'test' qrels \(splits here: train\)"):
        beir.main([no_test, "--root", root])
    none = beir_folder(tmp_path / "c", qrels="query-id\tcorpus-id\tscore\nq7\td1\t1\n")
    with pytest.raises(DataError, match=r"queries\.jsonl: none of the 1 queries of the qrels is in it"):
        beir.main([none, "--root", root])
    with pytest.raises(DataError, match="not a BEIR folder: no corpus.jsonl"):
        beir.Folder(str(tmp_path))


def test_beir_tasks_count_in_the_beir_average_not_mair(tmp_path):
    assert "Fever" not in mc.BEIR_TASKS and all(t in mc.TASK_DOMAIN for t in mc.BEIR_TASKS)
    root = str(tmp_path / "data")
    beir.main([beir_folder(tmp_path), "--root", root])
    domains = {t: mc.task_domain(t, root) for t in ("BEIR-scifact", "SciFact", "FiQA")}
    results = {"BEIR-scifact": {"m": {"Acc@1": 0.9, "nDCG@10": 0.5}}, "SciFact": {"m": {"Acc@1": 0.2}},
               "FiQA": {"m": {"Acc@1": 0.4, "nDCG@10": 0.3}}}
    table = metrics.results_table(results, domains, "p@1", "domains", beir_tasks=["FiQA"])
    header, row = [line.split("|")[1:-1] for line in table.splitlines()[:3:2]]
    cells = dict(zip([h.strip() for h in header], [c.strip() for c in row]))
    assert cells["MAIR avg (Acc@1)"] == "20.0" and cells["BEIR avg (nDCG@10)"] == "40.0"
