"""dataset/qg_training.py turns public training sets into query-generator SFT rows (offline: fixtures in
the published field names, the hub loader replaced), and sftqg.py refuses rows of evaluation tasks."""
import json
import logging
import os

import pytest

import data
import mair_config as mc
import sft
import sftqg
from dataset import beir, qg_training
from file_io import DataError, read_jsonl, write_jsonl

# BEIR's published field names: corpus {_id, title, text, metadata}, queries {_id, text, metadata},
# qrels/<split>.tsv "query-id corpus-id score" with a header line.
CORPUS = [{"_id": "d1", "title": "Aspirin", "text": "Aspirin thins the blood.", "metadata": {}},
          {"_id": "d2", "title": "", "text": "Statins lower cholesterol.", "metadata": {}},
          {"_id": "d3", "title": "Unjudged", "text": "Never in the qrels.", "metadata": {}}]
QUERIES = [{"_id": "q1", "text": "does aspirin thin the blood", "metadata": {}},
           {"_id": "q2", "text": "statins and cholesterol", "metadata": {}},
           {"_id": "q3", "text": "  ", "metadata": {}},
           {"_id": "q9", "text": "a test query", "metadata": {}}]
QRELS = [("q1", "d1", 1), ("q2", "d2", 1), ("q2", "d1", 0), ("q3", "d2", 1), ("q1", "gone", 1)]
EXPECTED = [("does aspirin thin the blood", "Aspirin Aspirin thins the blood."),
            ("statins and cholesterol", "Statins lower cholesterol.")]


def _tsv(rows):
    return "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows)


def beir_folder(root, name="scifact", split="train", corpus=CORPUS, queries=QUERIES, qrels=QRELS):
    folder = root / name
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(corpus, str(folder / "corpus.jsonl"))
    write_jsonl(queries, str(folder / "queries.jsonl"))
    (folder / "qrels" / f"{split}.tsv").write_text(_tsv(qrels))
    return str(folder)


def _pairs(path):
    return [(r["query"], r["doc"]) for r in read_jsonl(path)]


def test_beir_folder_becomes_sft_rows_with_the_table_instruction(tmp_path, caplog):
    folder, out = beir_folder(tmp_path), str(tmp_path / "sft" / "qg.jsonl")
    with caplog.at_level(logging.WARNING):
        qg_training.main([folder, "--out", out])
    rows = read_jsonl(out)
    assert _pairs(out) == EXPECTED
    assert {r["source"] for r in rows} == {"scifact"}
    assert {r["instruction"] for r in rows} == {qg_training.SOURCES["scifact"]["instruction"]}
    assert set(rows[0]) == {"instruction", "query", "doc", "source"}
    assert "1 pairs whose document is not in the corpus" in caplog.text
    assert "1 queries of the qrels without text" in caplog.text
    manifest = json.loads((tmp_path / "sft" / "qg.sources.json").read_text())
    assert manifest["scifact"]["pairs"] == 2
    assert manifest["scifact"]["from"]["qrels"] == os.path.join(folder, "qrels", "train.tsv")


def test_a_rerun_reuses_parts_and_a_failure_leaves_no_half_written_file(tmp_path, monkeypatch):
    folder, out = beir_folder(tmp_path), str(tmp_path / "qg.jsonl")
    qg_training.build([folder], out)
    before = open(out).read()

    def broken(*args):
        yield {"instruction": "i", "query": "q", "doc": "d", "source": "scifact"}
        raise DataError("boom")

    monkeypatch.setattr(qg_training, "beir_pairs", broken)
    qg_training.build([folder], out)                       # the part exists: reused, not re-read
    assert open(out).read() == before
    with pytest.raises(DataError, match="boom"):
        qg_training.build([folder], out, overwrite=True)
    assert open(out).read() == before
    assert read_jsonl(os.path.join(qg_training.parts_dir(out), "scifact.jsonl")) == read_jsonl(out)
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".tmp")]
    assert not leftovers


def _fake_hub(monkeypatch, files):
    """Replace the hub loader: spec -> rows of `files` by data_files; returns the specs asked for."""
    asked = []

    def load_rows(spec):
        asked.append(spec)
        return iter(files[spec["data_files"]])

    monkeypatch.setattr(beir, "load_rows", load_rows)
    return asked


def test_hub_source_reads_the_published_beir_files(tmp_path, monkeypatch):
    base = "hf://datasets/BeIR/hotpotqa"
    qrels = [{"query-id": q, "corpus-id": d, "score": s} for q, d, s in QRELS]
    asked = _fake_hub(monkeypatch, {f"{base}/corpus.jsonl.gz": CORPUS, f"{base}/queries.jsonl.gz": QUERIES,
                                    f"{base}-qrels/train.tsv": qrels})
    out = qg_training.build(["hotpotqa"], str(tmp_path / "qg.jsonl"))
    assert _pairs(out) == EXPECTED and {r["source"] for r in read_jsonl(out)} == {"hotpotqa"}
    assert [a["data_files"] for a in asked] == [f"{base}-qrels/train.tsv", f"{base}/queries.jsonl.gz",
                                                f"{base}/corpus.jsonl.gz"]
    assert asked[0]["features"] == {"query-id": "string", "corpus-id": "string", "score": "int64"}


def test_corpus_is_streamed_not_loaded(monkeypatch):
    read = []

    def corpus():
        for row in CORPUS:
            read.append(row["_id"])
            yield row

    base = "hf://datasets/BeIR/fever"
    _fake_hub(monkeypatch, {f"{base}/corpus.jsonl.gz": corpus(), f"{base}/queries.jsonl.gz": QUERIES,
                            f"{base}-qrels/train.tsv": [{"query-id": "q1", "corpus-id": "d1", "score": 1}]})
    *_, rows = qg_training.plan("fever")
    first = next(rows(None))
    assert first["doc"] == "Aspirin Aspirin thins the blood." and read == ["d1"]


def test_hub_qrels_spec_loads_with_datasets_offline(tmp_path):
    """The real loader on a local copy of a qrels file: ids stay text (leading zeros kept)."""
    path = tmp_path / "test.tsv"
    path.write_text(_tsv([("0001", "007", 1), ("2", "10", 0)]))
    spec = dict(beir.hub_specs("x")["qrels"], data_files=str(path))
    assert list(beir.load_rows(spec)) == [{"query-id": "0001", "corpus-id": "007", "score": 1},
                                          {"query-id": "2", "corpus-id": "10", "score": 0}]


MSMARCO_ROWS = [  # microsoft/ms_marco v2.1 fields
    {"answers": ["Yes."], "query": "is aspirin a blood thinner", "query_id": 19699, "query_type": "DESCRIPTION",
     "wellFormedAnswers": [], "passages": {"is_selected": [0, 1, 1], "url": ["u1", "u2", "u3"],
                                           "passage_text": ["Unrelated.", "Aspirin thins blood.", "It does."]}},
    {"answers": ["No Answer Present."], "query": "what is a statin", "query_id": 19700, "query_type": "DESCRIPTION",
     "wellFormedAnswers": [], "passages": {"is_selected": [0], "url": ["u4"], "passage_text": ["Other."]}},
]


def test_msmarco_qna_pairs_each_query_with_its_selected_passages(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(beir, "load_rows", lambda spec: asked.append(spec) or iter(MSMARCO_ROWS))
    out = qg_training.build(["msmarco-qna"], str(tmp_path / "qg.jsonl"))
    assert _pairs(out) == [("is aspirin a blood thinner", "Aspirin thins blood."),
                           ("is aspirin a blood thinner", "It does.")]
    assert asked == [{"path": "microsoft/ms_marco", "name": "v2.1", "split": "train"}]
    qg_training.build(["msmarco-qna"], str(tmp_path / "one.jsonl"), max_pairs=1)
    assert len(read_jsonl(str(tmp_path / "one.jsonl"))) == 1


def test_bad_training_sets_are_named(tmp_path, monkeypatch):
    empty = beir_folder(tmp_path / "a", queries=[])
    with pytest.raises(DataError, match=rf"{os.path.join(empty, 'queries.jsonl')}: no queries"):
        qg_training.build([empty], str(tmp_path / "a.jsonl"))
    folder = beir_folder(tmp_path / "b", split="test")
    with pytest.raises(DataError, match=r"qrels/train\.tsv: no such file, so no 'train' qrels \(splits here: test\)"):
        qg_training.build([folder], str(tmp_path / "b.jsonl"))
    bad = beir_folder(tmp_path / "c")
    with open(os.path.join(bad, "qrels", "train.tsv"), "a") as f:
        f.write("q1\td2\n")
    with pytest.raises(DataError, match=r"qrels/train\.tsv:7: expected 3 tab-separated columns"):
        qg_training.build([bad], str(tmp_path / "c.jsonl"))
    with open(os.path.join(bad, "qrels", "train.tsv"), "w") as f:
        f.write(_tsv([("q1", "d1", "high")]))
    with pytest.raises(DataError, match=r"qrels/train\.tsv:2: score 'high' is not an integer"):
        qg_training.build([bad], str(tmp_path / "c.jsonl"))
    with open(os.path.join(bad, "corpus.jsonl"), "a") as f:
        f.write("{broken\n")
    with open(os.path.join(bad, "qrels", "train.tsv"), "w") as f:
        f.write(_tsv([("q1", "d1", 1)]))
    with pytest.raises(DataError, match=r"corpus\.jsonl:4: malformed JSON"):
        qg_training.build([bad], str(tmp_path / "c.jsonl"))
    with pytest.raises(DataError, match="nq-train: no instruction: add it to SOURCES"):
        qg_training.build(["nq-train"], str(tmp_path / "d.jsonl"))
    monkeypatch.setattr(beir, "load_rows", lambda spec: iter([]))
    with pytest.raises(DataError, match="microsoft/ms_marco v2.1 train: no queries with a selected passage"):
        qg_training.build(["msmarco-qna"], str(tmp_path / "e.jsonl"))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".jsonl")]


# ----------------------------------------------------------------------------- the evaluation-data guard

@pytest.fixture
def eval_root(tmp_path):
    root = str(tmp_path / "data")
    write_jsonl([{"qid": "1", "instruction": "i", "query": "How do I open a socket?", "labels": []}],
                mc.queries_path("PyDoc-Net", root))
    return root


def _numbered(rows):
    return list(enumerate(rows, 1))


def test_eval_overlap_names_the_task_and_line(eval_root, caplog):
    clean = {"instruction": "i", "query": "other", "doc": "d", "source": "msmarco"}
    rows = [clean, {"instruction": "i", "query": "how do I  open a SOCKET?", "doc": "d", "source": "x"}]
    with pytest.raises(DataError, match=r"sft\.jsonl:2: .*query .* is a query of the evaluation task PyDoc-Net.*"
                                        r"1 of 2 rows .*ALLOW_EVAL_OVERLAP"):
        data.eval_overlap(_numbered(rows), "sft.jsonl", ["PyDoc-Net"], eval_root)
    by_source = [clean, clean, dict(clean, source="BeIR/scifact"), dict(clean, source="webis-touche2020")]
    with pytest.raises(DataError, match="sft.jsonl:3: .*source 'BeIR/scifact' is the evaluation task SciFact.*"
                                        r"2 of 4 rows .*\(line 3, 4\)"):
        data.eval_overlap(_numbered(by_source), "sft.jsonl", ["SciFact", "Touche"], eval_root)
    with caplog.at_level(logging.WARNING, logger="data"):
        assert data.eval_overlap(_numbered(by_source), "sft.jsonl", ["SciFact", "Touche"], eval_root, allow=True) == 2
    assert "no queries at" in caplog.text and "training on them anyway" in caplog.text
    assert data.eval_overlap(_numbered(rows), "sft.jsonl", [], eval_root) == 0
    assert data.eval_overlap(_numbered([clean]), "sft.jsonl", ["PyDoc-Net"], eval_root) == 0


def test_sftqg_refuses_evaluation_rows_before_training(tmp_path, eval_root, monkeypatch):
    path = str(tmp_path / "sft.jsonl")
    write_jsonl([{"instruction": "i", "query": "q", "doc": "d", "source": "msmarco"},
                 {"instruction": "i", "query": "q2", "doc": "d", "source": "PyDoc-Net"}], path)
    trained = []
    monkeypatch.setattr(sftqg, "C", dict(sftqg.C))
    monkeypatch.setattr(sft, "run_sft", lambda *args, **kwargs: trained.append(args))
    argv = [f"--SFT_DATA={path}", f"--DATA_ROOT={eval_root}", "--EVAL_TASKS=PyDoc-Net,PyCode-Dev"]
    with pytest.raises(DataError, match=rf"{path}:2: .*source 'PyDoc-Net' is the evaluation task PyDoc-Net"):
        sftqg.main(argv)
    assert not trained
    sftqg.main(argv + ["--ALLOW_EVAL_OVERLAP=true"])
    assert len(trained) == 1


def test_shipped_configs_guard_their_evaluation_tasks():
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    paper = json.load(open(os.path.join(configs, "paper.json")))
    assert paper["sftqg"]["EVAL_TASKS"] == paper["genir"]["TASKS"] == mc.BEIR_TASKS
    assert paper["sftqg"]["SFT_DATA"].endswith("qg-train.jsonl") and not paper["sftqg"]["TRAIN_TASKS"]
    assert paper["sftqg"]["ALLOW_EVAL_OVERLAP"] is False
    demo = json.load(open(os.path.join(configs, "demo.json")))
    assert demo["sftqg"]["EVAL_TASKS"] == demo["genir"]["TASKS"] == mc.DEMO_EVAL_TASKS
    assert demo["sftqg"]["ALLOW_EVAL_OVERLAP"] is False
