"""EVAL_EVERY_EPOCH (the released code's evaluation after every epoch, the default; the demo turns it
off) run both ways through genir.main, and the schedule sweep (STAGE=sweep) on the trained retriever."""
import dataclasses
import logging
import os
import re

import pytest

import decoding
import genir
import lm
import mair_config as mc
import metrics
import results
from file_io import read_json, read_jsonl, write_json
from small_corpus import write_small_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "PyDoc-Net"
SWITCHES = {"WEIGHT_DECAY": 0.0, "PRECISION": "bf16", "RANKNET_MODE": "joint", "BM25_STEMMER": "english",
            "BM25_POSITIVE_ONLY": True, "MAX_EVAL_INSTRUCTION_TOKENS": 64, "INSTRUCTION_IN_PROMPT": True, "ACC1": "p@1",
            "MAIR_AVERAGE": "domains",
            "NUM_PSEUDO": None, "DOCASQ_MODE": "random", "KEEP_CHECKPOINTS": 0, "DROP_NO_POSITIVE": False,
            "DOCASQ_REDRAW": False, "QUERY_FILTER": None}


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_root, tiny_model_path, one_thread):
    """One small corpus trained for 2 epochs and evaluated by genir.main with EVAL_EVERY_EPOCH on, then off."""
    tmp = str(tmp_path_factory.mktemp("epochs"))
    root = os.path.join(tmp, "data")
    write_small_corpus(root, demo_root, TASK, read_jsonl(mc.docs_path(TASK, demo_root))[:16])
    saved, found = dict(genir.C), {}
    logger, lines = logging.getLogger("genir"), Lines()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(lines)
    try:
        for setting in (True, False):
            genir.C.update(SWITCHES, BASE_MODEL=tiny_model_path, MODEL_DIR=os.path.join(tmp, f"models-{setting}"),
                           OUT_DIR=os.path.join(tmp, f"out-{setting}"), RUN="t", TASKS=[TASK], DATA_ROOT=root,
                           STAGE="all", NUM_Q=2, DOCASQ_N=1, DOCASQ_WORDS=16, LR=3e-3, WARMUP_RATIO=0.0, EPOCHS=2,
                           MAX_STEPS=None, BATCH_SIZE=16, MAX_LEN=128, RANK_EVERY=2, GROUP_SIZE=4, K=4,
                           EVAL_BATCH_SIZE=64, RERANK=True, EVAL_EVERY_EPOCH=setting)
            del lines.lines[:]
            assert genir.main([]) == 0
            found[setting] = {"settings": dict(genir.C), "out": genir.run_dir(), "log": list(lines.lines)}
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
        genir.C.clear()
        genir.C.update(saved)
    return found


@pytest.fixture()
def on(runs):
    saved = dict(genir.C)
    genir.C.update(runs[True]["settings"])
    yield runs[True]
    genir.C.clear()
    genir.C.update(saved)


def _body(text):
    """The cells of a markdown table's body rows."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return [r for r in rows[1:] if not r[0].startswith("---")]


def _rows(text):
    """{first cell: the other cells} of a markdown table's body rows."""
    return {r[0]: r[1:] for r in _body(text)}


def test_defaults_are_the_released_code_and_the_demo_sets_each_switch():
    demo = read_json(os.path.join(ROOT, "configs", "demo.json"))["genir"]
    paper = read_json(os.path.join(ROOT, "configs", "paper.json"))["genir"]
    assert genir.C["EVAL_EVERY_EPOCH"] is True and demo["EVAL_EVERY_EPOCH"] is False
    assert (genir.C["NUM_PSEUDO"], genir.C["DOCASQ_MODE"], genir.C["DOCASQ_REDRAW"], genir.C["QUERY_FILTER"]) == \
        (None, "random", False, None)
    assert (demo["NUM_PSEUDO"], demo["DOCASQ_MODE"], demo["DOCASQ_REDRAW"], demo["QUERY_FILTER"]) == \
        (0, "random", True, None)  # the recipe chosen on the development tasks (benchmarks/tune_demo.md)
    switches = {"EVAL_EVERY_EPOCH", "NUM_PSEUDO", "DOCASQ_MODE", "DOCASQ_REDRAW", "QUERY_FILTER", "MAX_STEPS", "SWEEP"}
    assert not switches & set(paper)  # the paper follows the defaults
    assert set(genir.C["SWEEP"]) == {"SLOPE", "MIDPOINT", "T_MAX"}
    assert all(genir.C[key] in values and len(values) > 2 for key, values in genir.C["SWEEP"].items())


def test_on_each_epoch_but_the_last_is_evaluated_with_that_epochs_model(on):
    epochs = read_json(os.path.join(on["out"], TASK, "epochs.json"))
    assert list(epochs) == ["1"]  # epoch 2, the last, is metrics.json's evaluation
    assert set(epochs["1"]) == {"ZeroGR", "ZeroGR (reranked)"} and set(epochs["1"]["ZeroGR"]) == set(metrics.MEASURES)
    assert sum(line.startswith(f"{TASK}: epoch 1 Acc@1 ") for line in on["log"]) == 1
    assert not any("epoch 2 Acc@1" in line for line in on["log"])
    # the figures are those of epoch 1's checkpoint evaluated from disk (the in-memory model then)
    model, tokenizer = lm.load_model(os.path.join(genir.model_dir(TASK), "checkpoint-epoch1"))
    t = genir.load_task(TASK, model, tokenizer)
    assert genir.method_metrics(t.qrels, genir.zerogr_runs(t)) == epochs["1"]


def test_on_results_have_a_per_epoch_table_with_the_final_epoch_and_the_best_marked(on):
    text = open(os.path.join(on["out"], "results.md"), encoding="utf-8").read()
    section = text.split("## ZeroGR per epoch")[1].split("\n## ")[0]
    assert "The tables above report the final epoch" in section
    assert "chosen on these test queries, so not a fair held-out figure" in section
    rows = _rows(section)
    assert list(rows) == ["1", "2 (final)"]
    final = read_json(os.path.join(on["out"], TASK, "metrics.json"))["methods"]["ZeroGR"]["Acc@1"]
    first = read_json(os.path.join(on["out"], TASK, "epochs.json"))["1"]["ZeroGR"]["Acc@1"]
    assert [rows[r][0].strip("*") for r in rows] == [f"{100 * first:.1f}", f"{100 * final:.1f}"]
    best = "1" if first > final else "2 (final)"
    assert [r for r in rows if rows[r][0].startswith("**")] == [best]


def test_off_writes_no_epoch_figures_and_training_is_the_same(runs):
    off, on = runs[False], runs[True]
    assert not os.path.exists(os.path.join(off["out"], TASK, "epochs.json"))
    assert "per epoch" not in open(os.path.join(off["out"], "results.md"), encoding="utf-8").read()
    assert not any("epoch 1 Acc@1" in line for line in off["log"])
    # evaluating between epochs changes nothing in training: the same losses, the same final figures
    history = [read_json(os.path.join(r["settings"]["MODEL_DIR"], "t", TASK, "training_complete.json"))["history"]
               for r in (on, off)]
    assert [h["loss"] for h in history[0]] == [h["loss"] for h in history[1]]
    assert read_json(os.path.join(on["out"], TASK, "metrics.json"))["methods"] == \
        read_json(os.path.join(off["out"], TASK, "metrics.json"))["methods"]


def test_a_resumed_run_keeps_earlier_epochs_and_the_table_marks_the_best(tmp_path):
    folder = str(tmp_path / "T")
    for epoch, value in ((1, 0.2), (2, 0.4)):
        results.record_epoch(folder, epoch, {"ZeroGR": {"Acc@1": value, "nDCG@1": value / 2}})
    results.record_epoch(folder, 3, {"ZeroGR": {"Acc@1": 0.6, "nDCG@1": 0.1}})  # after a resume from epoch 2
    assert list(read_json(os.path.join(folder, "epochs.json"))) == ["1", "2", "3"]
    write_json({"epochs": 4, "methods": {"ZeroGR": {"Acc@1": 0.5, "nDCG@1": 0.5}}},
               os.path.join(folder, "metrics.json"))
    found = {"T": read_json(os.path.join(folder, "metrics.json"))}
    assert _rows(results.epoch_section(str(tmp_path), found, "p@1")) == \
        {"1": ["20.0"], "2": ["40.0"], "3": ["**60.0**"], "4 (final)": ["50.0"]}
    assert _rows(results.epoch_section(str(tmp_path), found, "ndcg@1"))["4 (final)"] == ["**50.0**"]
    assert results.epoch_section(str(tmp_path / "none"), found, "p@1") == ""


def test_sweep_varies_one_parameter_at_a_time_and_reuses_its_runs(on, monkeypatch):
    genir.C.update(SWEEP={"SLOPE": [5.0, 10.0], "T_MAX": [1.5, 3.0]})
    decoded, real = [], decoding.decode

    def spy(model, tree, prompts, settings, **kwargs):
        decoded.append(settings)
        return real(model, tree, prompts, settings, **kwargs)

    monkeypatch.setattr(decoding, "decode", spy)
    assert genir.main(["--STAGE=sweep"]) == 0
    default = genir.decode_settings()
    assert decoded == [dataclasses.replace(default, slope=5.0), dataclasses.replace(default, t_max=3.0)]
    rows = _body(open(os.path.join(on["out"], "sweep.md"), encoding="utf-8").read())
    assert [r[:2] for r in rows] == [["SLOPE", "5.0"], ["SLOPE", "10.0 (default)"], ["T_MAX", "1.5 (default)"],
                                     ["T_MAX", "3.0"]]
    stored = read_json(os.path.join(on["out"], "sweep.json"))["rows"]
    assert [(r["parameter"], r["value"], r["default"]) for r in stored] == \
        [("SLOPE", 5.0, False), ("SLOPE", 10.0, True), ("T_MAX", 1.5, True), ("T_MAX", 3.0, False)]
    assert [r[2] for r in rows] == [metrics.pct(r["tasks"][TASK]["Acc@1"]) for r in stored]  # Acc@1 of the task
    qrels = genir.load_task(TASK).qrels
    main = read_json(os.path.join(on["out"], TASK, "metrics.json"))["methods"]["ZeroGR"]
    runs = {}
    for row, name in zip(stored, ("sweep-SLOPE=5.0", "zerogr", "zerogr", "sweep-T_MAX=3.0")):
        path = os.path.join(on["out"], TASK, f"{name}.run")
        runs[path] = os.path.getmtime(path)
        assert row["tasks"][TASK] == pytest.approx(metrics.evaluate(qrels, metrics.read_trec_run(path))[0])
        assert row["default"] is False or row["tasks"][TASK] == pytest.approx(main)
    decoded.clear()
    assert genir.main(["--STAGE=sweep"]) == 0  # a rerun reads the runs it wrote
    assert decoded == [] and {p: os.path.getmtime(p) for p in runs} == runs
    assert read_json(os.path.join(on["out"], "sweep.json"))["rows"] == stored


@pytest.mark.parametrize("value, message", [
    ('{"SLOPES": [5.0]}', "SWEEP names 'SLOPES', not one of 'SLOPE', 'MIDPOINT', 'T_MAX'"),
    ('{"K": [10, 20]}', "SWEEP names 'K', not one of"),
    ('{"T_MAX": []}', "SWEEP['T_MAX']=[] is not a non-empty list of numbers"),
    ('{"MIDPOINT": ["a"]}', "SWEEP['MIDPOINT']=['a'] is not a non-empty list of numbers"),
])
def test_a_bad_sweep_is_refused_before_anything_runs(value, message, tmp_path):
    saved = dict(genir.C)
    try:
        with pytest.raises(SystemExit, match=re.escape(message)):
            genir.main([f"--SWEEP={value}", "--STAGE=sweep", f"--TASKS={TASK}", f"--OUT_DIR={tmp_path / 'out'}"])
    finally:
        genir.C.clear()
        genir.C.update(saved)
    assert not os.path.exists(tmp_path / "out")
