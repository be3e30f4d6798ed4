"""genir.py: retriever training, evaluation next to BM25, tables, bad input, the distributed path."""
import os
import subprocess
import sys
import time

import pytest

import genir
import lm
import mair_config as mc
import metrics
import rank_groups
import ranking
import train_data
from data import eval_queries, load_docids
from file_io import read_json, read_jsonl, write_json, write_jsonl
from small_corpus import write_small_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["PyDoc-Net", "PyCode-Dev"]
N_DOCS = 40


def _settings(root, tmp, tiny):
    return {"BASE_MODEL": tiny, "MODEL_DIR": os.path.join(tmp, "models"), "OUT_DIR": os.path.join(tmp, "out"),
            "RUN": "t", "TASKS": TASKS, "DATA_ROOT": root, "NUM_Q": 2, "DOCASQ_N": 2, "DOCASQ_WORDS": 24,
            "LR": 3e-3, "WARMUP_RATIO": 0.0, "EPOCHS": 25, "MAX_STEPS": None, "BATCH_SIZE": 16, "MAX_LEN": 128,
            "RANK_EVERY": 4, "GROUP_SIZE": 4, "K": 12, "EVAL_BATCH_SIZE": 64, "NUM_BEAMS": 6,
            "ABLATION_MODES": ["greedy", "iterative_greedy", "reverse_annealed"],
            "BM25_STEMMER": "english", "BM25_POSITIVE_ONLY": True, "MAX_EVAL_INSTRUCTION_TOKENS": 64,
            "INSTRUCTION_IN_PROMPT": True, "ACC1": "p@1", "MAIR_AVERAGE": "domains", "EVAL_EVERY_EPOCH": False,
            "NUM_PSEUDO": None, "DOCASQ_REDRAW": False, "QUERY_FILTER": None, "DOCASQ_MODE": "random"}


def _make_corpus(root, demo_root):
    """Two small corpora with teacher DocIDs and, as pseudo-queries, each document's real queries."""
    for task in TASKS:
        write_small_corpus(root, demo_root, task, read_jsonl(mc.docs_path(task, demo_root))[:N_DOCS])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_root, tiny_model_path):
    """Both corpora trained and evaluated once; the settings are restored afterwards."""
    tmp = str(tmp_path_factory.mktemp("genir"))
    root = os.path.join(tmp, "data")
    _make_corpus(root, demo_root)
    saved = dict(genir.C)
    genir.C.update(_settings(root, tmp, tiny_model_path))
    code = genir.main([])
    yield {"tmp": tmp, "root": root, "code": code, "settings": dict(genir.C)}
    genir.C.clear()
    genir.C.update(saved)


@pytest.fixture()
def settings(trained):
    saved = dict(genir.C)
    genir.C.update(trained["settings"])
    yield genir.C
    genir.C.clear()
    genir.C.update(saved)


def test_training_lowers_the_loss_and_retrieves_training_queries(trained, settings):
    assert trained["code"] == 0
    summary = read_json(os.path.join(genir.model_dir("PyDoc-Net"), "training_complete.json"))
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < 0.5 * losses[0]
    queries = read_jsonl(mc.pseudo_queries_path("PyDoc-Net", "QG", 2, trained["root"]))
    for i, q in enumerate(queries):
        q["qid"] = str(i)
    docs = read_jsonl(mc.docs_path("PyDoc-Net", trained["root"]))
    gists, _ = load_docids(mc.gist_path("PyDoc-Net", root=trained["root"]), docs, "PyDoc-Net")
    model, tok = lm.load_model(genir.model_dir("PyDoc-Net"))
    tree = genir.load_trie("PyDoc-Net", tok, docs, gists)
    rankings = genir.decode_queries(model, tok, tree, queries, "greedy")
    hits = sum(rankings[q["qid"]][:1] == [q["labels"][0]["id"]] for q in queries)
    assert hits / len(queries) > 10 / N_DOCS  # chance is 1 / N_DOCS


def test_outputs_have_every_task_and_method(trained, settings):
    text = open(os.path.join(genir.run_dir(), "results.md"), encoding="utf-8").read()
    for name in TASKS + list(genir.METHODS.values()) + ["Code", "MAIR avg"]:
        assert name in text
    for task in TASKS:
        result = read_json(os.path.join(genir.run_dir(), task, "metrics.json"))
        assert set(result["methods"]) == set(genir.METHODS.values())
        assert result["queries"] == len(read_jsonl(mc.queries_path(task, trained["root"])))
        for name in genir.METHODS:
            run = metrics.read_trec_run(os.path.join(genir.run_dir(), task, f"{name}.run"))
            assert len(run) == result["decoded_queries"]
            assert all(len(docs) <= 100 for docs in run.values())
    bm25 = read_json(os.path.join(genir.run_dir(), "PyDoc-Net", "metrics.json"))["methods"]["BM25"]["Acc@1"]
    assert bm25 > 0.2


def test_written_run_is_evaluated_to_hand_computed_metrics(tmp_path):
    qrels = {"q1": {"a": 1}, "q2": {"b": 1, "c": 1}, "q3": {"d": 1}}
    rankings = {"q1": ["a", "x"], "q2": ["x", "c", "b"]}
    path = str(tmp_path / "m.run")
    metrics.write_trec_run(metrics.run_from_rankings(rankings), path, "m")
    values, _ = metrics.evaluate(qrels, metrics.read_trec_run(path))
    assert values["Acc@1"] == pytest.approx(1 / 3)
    assert values["R@100"] == pytest.approx((1 + 1 + 0) / 3)
    assert values["MAP"] == pytest.approx((1 + (1 / 2 + 2 / 3) / 2 + 0) / 3)


def test_ranking_loss_step_runs(trained, settings):
    docs = read_jsonl(mc.docs_path("PyDoc-Net", trained["root"]))
    gists, _ = load_docids(mc.gist_path("PyDoc-Net", root=trained["root"]), docs, "PyDoc-Net")
    model, tok = lm.load_model(genir.model_dir("PyDoc-Net"))
    token = genir.rank_token_id(tok)
    supplier = rank_groups.RankGroups(tok, docs, gists, genir.training_queries("PyDoc-Net", docs), token,
                                     genir.train_data_settings())
    assert supplier(1) is None
    batch = supplier(0)
    assert batch["input_ids"].shape[0] == 16 and batch["group_size"] == 4
    loss = ranking.ranknet_loss(model, batch)
    loss.backward()
    assert loss.item() > 0 and model.get_output_embeddings().weight.grad is not None


def test_unknown_labels_and_empty_queries_are_reported(settings, trained):
    path = mc.queries_path("PyDoc-Net", trained["root"])
    rows = read_jsonl(path)
    bad = rows + [{"qid": "x1", "instruction": "", "query": "anything", "labels": [{"id": "no.such.doc", "score": 1}]},
                  {"qid": "x2", "instruction": "", "query": "  ", "labels": [{"id": rows[0]["labels"][0]["id"], "score": 1}]}]
    write_jsonl(bad, path)
    try:
        docs = read_jsonl(mc.docs_path("PyDoc-Net", trained["root"]))
        queries, qrels, report = eval_queries(path, {d["id"] for d in docs}, genir.C["DROP_NO_POSITIVE"])
        assert report["unknown_labels"] == 1 and report["empty_query"] == 1
        assert "x1" in qrels and "x2" in qrels and "x2" not in {q["qid"] for q in queries}
    finally:
        write_jsonl(rows, path)


def test_missing_docids_fail_one_corpus_and_the_others_finish(settings, trained, tmp_path):
    genir.C.update(RUN="t-missing", MODEL_DIR=str(tmp_path / "m"), OUT_DIR=str(tmp_path / "o"), EPOCHS=1)
    gist = mc.gist_path("PyCode-Dev", root=trained["root"])
    rows = read_jsonl(gist)
    os.remove(gist)
    try:
        assert genir.main([]) == 1
    finally:
        write_jsonl(rows, gist)
    failures = read_json(os.path.join(genir.run_dir(), "failures.json"))
    assert list(failures) == ["PyCode-Dev"] and "no DocIDs" in failures["PyCode-Dev"]
    assert os.path.exists(os.path.join(genir.run_dir(), "PyDoc-Net", "metrics.json"))
    assert "Not finished: PyCode-Dev" in open(os.path.join(genir.run_dir(), "results.md")).read()


def test_docid_file_not_covering_every_document_is_counted(settings, trained):
    docs = read_jsonl(mc.docs_path("PyDoc-Net", trained["root"]))
    gist = mc.gist_path("PyDoc-Net", root=trained["root"])
    rows = read_jsonl(gist)
    write_jsonl(rows[:-3] + [{"id": "ghost", "gist": "x y"}], gist)
    try:
        gists, warnings = load_docids(gist, docs, "PyDoc-Net")
    finally:
        write_jsonl(rows, gist)
    assert len(gists) == len(docs) - 3
    assert any("3 of 40 documents have no DocID" in w for w in warnings)
    assert any("1 DocIDs for documents not in the corpus" in w for w in warnings)


def test_unknown_task_is_a_clear_error(settings):
    with pytest.raises(mc.UnknownTaskError, match="unknown task 'NoSuchTask'"):
        genir.main(["--TASKS=['NoSuchTask']"])


def test_ablation_writes_table_and_plots(settings, trained):
    genir.C.update(TASKS=["PyDoc-Net"])
    path = genir.ablation(["PyDoc-Net"])
    text = open(path, encoding="utf-8").read()
    for mode in genir.C["ABLATION_MODES"]:
        assert mode in text
    assert "significant" in text
    for name in ("ablation.png", "schedule.png"):
        assert os.path.getsize(os.path.join(genir.run_dir(), name)) > 1000
    per_query = read_json(os.path.join(genir.run_dir(), "ablation_per_query.json"))
    assert set(per_query) == set(genir.C["ABLATION_MODES"])
    n = len(read_jsonl(mc.queries_path("PyDoc-Net", trained["root"])))
    assert all(len(per_query[m]["Acc@1"]) == n for m in per_query)
    cached = os.path.join(genir.run_dir(), "PyDoc-Net", "ablation-greedy.run")
    assert os.path.exists(cached)
    genir.ablation(["PyDoc-Net"])  # a rerun reuses the finished runs
    assert read_json(os.path.join(genir.run_dir(), "ablation_per_query.json")) == per_query


def test_two_process_evaluation_matches_one_process(trained, tmp_path):
    """torchrun with 2 CPU processes splits the queries and gathers the same metrics (sampled
    reverse-annealed decoding included: each query's noise is keyed by its qid)."""
    settings = dict(trained["settings"], OUT_DIR=str(tmp_path / "out2"), STAGE="eval", TASKS=["PyDoc-Net"],
                    RERANK=False)
    one_dir = str(tmp_path / "out1")
    genir_one = dict(settings, OUT_DIR=one_dir)
    config = str(tmp_path / "cfg.json")
    write_json({"genir": settings}, config)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "genir.py",
           "--config", config]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    write_json({"genir": genir_one}, config)
    single = subprocess.run([sys.executable, "genir.py", "--config", config], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    two = read_json(os.path.join(settings["OUT_DIR"], "t", "PyDoc-Net", "metrics.json"))["methods"]
    one = read_json(os.path.join(one_dir, "t", "PyDoc-Net", "metrics.json"))["methods"]
    assert two["ZeroGR"] == one["ZeroGR"] and two["BM25"] == one["BM25"]


def test_fast_rerank_equals_scoring_whole_sequences(trained, settings):
    """Rerank shares each prompt's cache across its candidates; the order must be that of scoring
    every [query -> DocID] sequence on its own."""
    docs = read_jsonl(mc.docs_path("PyDoc-Net", trained["root"]))
    gists, _ = load_docids(mc.gist_path("PyDoc-Net", root=trained["root"]), docs, "PyDoc-Net")
    queries, _, _ = eval_queries(mc.queries_path("PyDoc-Net", trained["root"]), {d["id"] for d in docs},
                                 genir.C["DROP_NO_POSITIVE"])
    queries = queries[:4]
    model, tok = lm.load_model(genir.model_dir("PyDoc-Net"))
    token = genir.rank_token_id(tok)
    ids = [d["id"] for d in docs]
    rankings = {str(q["qid"]): ids[3 * i:3 * i + 4 + 2 * i] for i, q in enumerate(queries)}
    fast = genir.rerank(model, tok, queries, rankings, gists, token)
    for q in queries:
        cands = rankings[str(q["qid"])]
        prompt = train_data.query_prompt(tok, q.get("instruction"), q["query"],
                                         genir.C["MAX_EVAL_INSTRUCTION_TOKENS"], genir.C["MAX_EVAL_QUERY_TOKENS"])
        batch = lm.collate([lm.encode_example(tok, prompt, gists[d], 1000) for d in cands], tok.pad_token_id)
        scores = ranking.rank_scores(model, batch["input_ids"], batch["attention_mask"], token).tolist()
        assert fast[str(q["qid"])] == [cands[j] for j in sorted(range(len(cands)), key=lambda j: -scores[j])]


def test_one_two_process_launch_trains_and_evaluates_every_corpus(trained, tmp_path):
    """`accelerate launch` with two CPU processes over both demo corpora, STAGE=all: each corpus is
    trained by both processes, evaluated after epoch 1 (EVAL_EVERY_EPOCH: every rank decodes its share
    with the model unwrapped from DDP), each task evaluated, and the gathered runs hold every query once."""
    settings = dict(trained["settings"], MODEL_DIR=str(tmp_path / "models"), OUT_DIR=str(tmp_path / "out"),
                    STAGE="all", EPOCHS=2, KEEP_CHECKPOINTS=1, K=8, EVAL_EVERY_EPOCH=True)
    config = str(tmp_path / "cfg.json")
    write_json({"genir": settings}, config)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "genir.py", "--config", config]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = os.path.join(settings["OUT_DIR"], "t")
    assert not os.path.exists(os.path.join(out, "failures.json"))
    for task in TASKS:
        folder = os.path.join(settings["MODEL_DIR"], "t", task)
        assert read_json(os.path.join(folder, "training_complete.json"))["num_processes"] == 2
        assert sorted(d for d in os.listdir(folder) if d.startswith("checkpoint-")) == ["checkpoint-epoch2"]
        result = read_json(os.path.join(out, task, "metrics.json"))
        qids = {str(q["qid"]) for q in read_jsonl(mc.queries_path(task, trained["root"])) if q["query"].strip()}
        assert result["decoded_queries"] == len(qids)
        epochs = read_json(os.path.join(out, task, "epochs.json"))
        assert list(epochs) == ["1"] and set(epochs["1"]) == {"ZeroGR", "ZeroGR (reranked)"}
        for name in genir.METHODS:
            with open(os.path.join(out, task, f"{name}.run"), encoding="utf-8") as f:
                lines = [line.split() for line in f]
            assert {line[0] for line in lines} == qids
            assert len({(line[0], line[2]) for line in lines}) == len(lines)


def test_a_failing_rank_stops_the_launch_and_a_rerun_resumes(trained, tmp_path):
    """Rank 1 fails on a task: the launch ends at once (not after DIST_TIMEOUT), naming the rank;
    the rerun finishes every task and keeps the finished ones."""
    settings = dict(trained["settings"], OUT_DIR=str(tmp_path / "out"), STAGE="eval", RERANK=False, K=4,
                    DIST_TIMEOUT=300)
    config = str(tmp_path / "cfg.json")
    write_json({"genir": settings}, config)
    faulty = tmp_path / "faulty_genir.py"
    faulty.write_text(
        "import os, sys\nimport genir\n"
        "real = genir.evaluate_task\n"
        "def evaluate_task(task, cache):\n"
        "    if os.environ['RANK'] == '1' and task == 'PyCode-Dev':\n"
        "        raise RuntimeError('injected fault')\n"
        "    return real(task, cache)\n"
        "genir.evaluate_task = evaluate_task\nsys.exit(genir.main())\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    started = time.time()
    run = subprocess.run(cmd + [str(faulty), "--config", config], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode != 0 and time.time() - started < settings["DIST_TIMEOUT"]
    assert "rank 1: PyCode-Dev evaluation failed" in run.stderr
    out = os.path.join(settings["OUT_DIR"], "t")
    first = os.path.getmtime(os.path.join(out, "PyDoc-Net", "metrics.json"))
    assert not os.path.exists(os.path.join(out, "PyCode-Dev", "metrics.json"))
    again = subprocess.run(cmd + ["genir.py", "--config", config], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert os.path.getmtime(os.path.join(out, "PyDoc-Net", "metrics.json")) == first
    assert os.path.exists(os.path.join(out, "PyCode-Dev", "metrics.json"))
    assert not os.path.exists(os.path.join(out, "failures.json"))
