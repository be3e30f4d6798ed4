"""Training switches that choose between the released code's behaviour (each default) and ours:
WEIGHT_DECAY, PRECISION, RANKNET_MODE and MAX_STEPS, each run through the real training code in both settings."""
import dataclasses
import json
import logging
import os
import random

import pytest
import torch

import genir
import lm
import mair_config as mc
import rank_groups
import sft
import sftid
import sftqg
import train_data
from file_io import read_jsonl
from small_corpus import write_small_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINERS = {"sftqg": sftqg, "sftid": sftid, "genir": genir}
RELEASED = {"WEIGHT_DECAY": 0.01, "PRECISION": "bf16"}
DEMO = {"WEIGHT_DECAY": 0.0, "PRECISION": "bf16"}


def settings(**values):
    """SFT settings for the tiny model, every switch given: `values` over these."""
    return sft.SFTSettings(**{"lr": 1e-3, "epochs": 1, "max_steps": None, "batch_size": 8, "grad_accum": 1,
                              "warmup_steps": 0,
                              "warmup_ratio": 0.0, "grad_clip": 1.0, "weight_decay": 0.0, "seed": 0, "log_every": 10,
                              "wandb": None, "wandb_project": "zerogr", "keep_checkpoints": 0, "dist_timeout": 1800,
                              "precision": "bf16", "ranknet_mode": "joint", **values})


@pytest.fixture(scope="module")
def examples(demo_root, tiny_model_path):
    tok = lm.load_tokenizer(tiny_model_path)
    docs = read_jsonl(mc.docs_path("PyCode-Text", demo_root))[:32]
    return [lm.encode_example(tok, lm.truncate_words(d["doc"], 30), lm.truncate_words(d["doc"], 5), 80) for d in docs]


def train(path, out, cfg, examples, **extra):
    """train_sft on the tiny model from `path`; (model, summary, the last checkpoint's optimizer.pt)."""
    model, tok, _ = sft.load_for_training(path, out, cfg.precision)
    summary = sft.train_sft(model, tok, examples, out, cfg, **extra)
    saved = torch.load(os.path.join(sft.last_checkpoint(out), "optimizer.pt"), weights_only=False)
    return model, summary, saved


# ---------------------------------------------------------------------------------------------- defaults

def test_defaults_are_the_released_code_and_the_demo_keeps_ours():
    demo = json.load(open(os.path.join(ROOT, "configs", "demo.json")))
    for name, module in TRAINERS.items():
        assert {k: module.C[k] for k in RELEASED} == RELEASED, name
        assert {k: demo[name][k] for k in DEMO} == DEMO, name
    assert genir.C["RANKNET_MODE"] == "released" and demo["genir"]["RANKNET_MODE"] == "joint"
    assert all(module.C["MAX_STEPS"] is None and "MAX_STEPS" in demo[name] for name, module in TRAINERS.items())


@pytest.mark.parametrize("script, argv, message", [
    ("sftqg", ["--PRECISION=fp16"], "PRECISION='fp16' is not one of 'bf16', 'fp32_autocast'"),
    ("sftid", ["--PRECISION=fp32"], "PRECISION='fp32' is not one of 'bf16', 'fp32_autocast'"),
    ("genir", ["--PRECISION=bf16_autocast"], "PRECISION='bf16_autocast' is not one of"),
    ("genir", ["--RANKNET_MODE=both"], "RANKNET_MODE='both' is not one of 'released', 'joint'"),
])
def test_an_unknown_switch_value_is_refused_before_anything_runs(script, argv, message, tmp_path):
    module = TRAINERS[script]
    saved = dict(module.C)
    try:
        with pytest.raises(SystemExit, match=message):
            module.main(argv + [f"--OUT_DIR={tmp_path / 'out'}"])
    finally:
        module.C.clear()
        module.C.update(saved)
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------------------------------------- WEIGHT_DECAY

def test_weight_decay_shrinks_every_weight_by_lr_times_decay(tiny_model_path, examples, tmp_path, one_thread):
    """One AdamW step from the same weights on the same batch: with decay d the weights end lr * d * w0 below
    the undecayed step (decoupled decay, on every parameter, as torch's AdamW with the released code's 0.01)."""
    start, _ = lm.load_model(tiny_model_path)
    w0 = {k: v.clone() for k, v in start.state_dict().items()}
    lr, after = 0.05, {}
    for decay in (0.0, 0.01):
        cfg = settings(lr=lr, batch_size=len(examples), weight_decay=decay)
        model, summary, saved = train(tiny_model_path, str(tmp_path / f"wd{decay}"), cfg, examples)
        assert summary["global_step"] == 1
        assert {g["weight_decay"] for g in saved["optimizer"]["param_groups"]} == {decay}
        after[decay] = model.state_dict()
    for name, w in w0.items():
        torch.testing.assert_close(after[0.0][name] - after[0.01][name], lr * 0.01 * w, rtol=1e-2, atol=1e-7)


# ---------------------------------------------------------------------------------------------- MAX_STEPS

class EpochAware(list):
    """Examples that note each epoch train_sft announces (as train_data.EncodedExamples needs for DOCASQ_REDRAW)."""
    seen = None

    def set_epoch(self, epoch):
        self.seen.append(epoch)


@pytest.mark.parametrize("epochs, max_steps, steps, evaluated", [(2, None, [4, 8], [1]), (1, 6, [4, 6], [1]),
                                                                (9, 3, [3], [])])
def test_max_steps_is_a_budget_over_epochs_the_last_cut_short(epochs, max_steps, steps, evaluated, tiny_model_path,
                                                              examples, tmp_path, one_thread):
    data, after = EpochAware(examples), []
    data.seen = []
    cfg = settings(epochs=epochs, max_steps=max_steps, batch_size=8)  # 32 examples: 4 steps an epoch
    _, summary, saved = train(tiny_model_path, str(tmp_path / "out"), cfg, data,
                              after_epoch=lambda epoch, model: after.append(epoch))
    assert [h["steps"] for h in summary["history"]] == steps and summary["global_step"] == steps[-1]
    assert list(dict.fromkeys(data.seen)) == list(range(len(steps))) and after == evaluated  # never after the last
    assert saved["scheduler"]["last_epoch"] == steps[-1] and sft.epochs_trained(str(tmp_path / "out")) == len(steps)


def test_a_resumed_run_tells_the_dataset_its_epoch(tiny_model_path, examples, tmp_path, one_thread):
    out, data = str(tmp_path / "out"), EpochAware(examples)
    train(tiny_model_path, out, settings(epochs=1, max_steps=None, batch_size=8), examples)
    os.remove(os.path.join(out, "training_complete.json"))  # as if stopped after epoch 1 of 2
    data.seen = []
    _, summary, _ = train(tiny_model_path, out, settings(epochs=2, max_steps=None, batch_size=8), data)
    assert set(data.seen) == {1} and summary["global_step"] == 8


# ---------------------------------------------------------------------------------------------- PRECISION

def test_precision_decides_weights_and_autocast_on_cuda(tiny_model_path, examples, tmp_path, monkeypatch):
    """With CUDA claimed (nothing moved there): "bf16" loads bf16 weights and trains them without autocast
    (AdamW on the bf16 weights); "fp32_autocast" loads float32 weights and asks accelerate for bf16 autocast."""
    assert sft.training_precision("bf16", True) == (torch.bfloat16, "no")
    assert sft.training_precision("fp32_autocast", True) == (torch.float32, "bf16")
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        sft.training_precision("fp16", True)
    monkeypatch.setattr(lm, "cuda_available", lambda: True)
    monkeypatch.setattr(sft, "init_distributed", lambda timeout: None)

    class Built(Exception):
        pass

    def accelerator(**kwargs):
        raise Built(kwargs)

    import accelerate
    monkeypatch.setattr(accelerate, "Accelerator", accelerator)
    for precision, dtype, mixed in (("bf16", torch.bfloat16, "no"), ("fp32_autocast", torch.float32, "bf16")):
        model, tok, _ = sft.load_for_training(tiny_model_path, str(tmp_path / precision), precision)
        assert {p.dtype for p in model.parameters()} == {dtype}
        with pytest.raises(Built) as built:
            sft._Training(model, tok, examples, str(tmp_path / precision), settings(precision=precision), None, None,
                          "t")
        assert built.value.args[0]["mixed_precision"] == mixed and built.value.args[0]["cpu"] is False


@pytest.mark.parametrize("precision", ["bf16", "fp32_autocast"])
def test_on_the_cpu_either_precision_trains_in_float32(precision, tiny_model_path, examples, tmp_path, one_thread,
                                                       caplog):
    from accelerate.state import AcceleratorState

    sft._cpu_precision_note.cache_clear()
    with caplog.at_level(logging.INFO, logger="sft"):
        model, summary, _ = train(tiny_model_path, str(tmp_path / "out"), settings(precision=precision), examples)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert AcceleratorState().mixed_precision == "no"
    assert summary["global_step"] == 4 and all(h["loss"] == h["loss"] for h in summary["history"])
    assert caplog.text.count(f"PRECISION={precision} applies to CUDA only") == 1


# ---------------------------------------------------------------------------------------------- RANKNET_MODE: steps

class EveryOther(sft.SeededBatches):
    """An extra batch of 4 examples on every other optimizer step."""

    def __init__(self, examples, pad_id):
        self.rng, self.examples, self.pad_id = random.Random(1), examples, pad_id

    def __call__(self, step):
        return None if step % 2 else lm.collate(self.rng.sample(self.examples, 4), self.pad_id)


@pytest.mark.parametrize("mode, optimizer_steps", [("released", 4 + 2), ("joint", 4)])
def test_ranknet_mode_released_takes_a_step_of_its_own(mode, optimizer_steps, tiny_model_path, examples, tmp_path,
                                                       one_thread):
    """4 batches, an extra (ranking) batch on steps 0 and 2. "released": each one is a forward, backward,
    optimizer step and scheduler step of its own after the LM step, so AdamW steps 6 times and the warmup
    advances 6 steps; "joint": it is added to its LM step's loss, 4 steps in all."""
    calls = []

    def extra_loss(model, batch):
        calls.append(len(batch["input_ids"]))
        return sft.SFTModule(model)(**batch)

    tok = lm.load_tokenizer(tiny_model_path)
    cfg = settings(ranknet_mode=mode, warmup_steps=8)
    _, summary, saved = train(tiny_model_path, str(tmp_path / mode), cfg, examples, extra_loss=extra_loss,
                              extra_batches=EveryOther(examples, tok.pad_token_id))
    assert calls == [4, 4]
    assert summary["global_step"] == 4 and summary["extra_steps"] == optimizer_steps - 4
    assert {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {optimizer_steps}
    assert saved["scheduler"]["last_epoch"] == optimizer_steps
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cfg.lr * optimizer_steps / 8)


# ---------------------------------------------------------------------------------------------- RANKNET_MODE: groups

N_DOCS = 6


@pytest.fixture(scope="module")
def groups(tmp_path_factory, demo_root, tiny_model_path):
    """A 6-document training set (each document a ranking group) and a RankGroups maker over it."""
    tmp = str(tmp_path_factory.mktemp("groups"))
    root = os.path.join(tmp, "data")
    docs = [d for d in read_jsonl(mc.docs_path("PyDoc-Net", demo_root)) if len(d["doc"].split()) > 20][:N_DOCS]
    write_small_corpus(root, demo_root, "PyDoc-Net", docs)
    saved = dict(genir.C)
    genir.C.update(DATA_ROOT=root, MODEL_DIR=os.path.join(tmp, "models"), RUN="t", NUM_Q=2, DOCASQ_N=1,
                   DOCASQ_WORDS=16, MAX_LEN=128, SEED=0)
    tok = lm.load_tokenizer(tiny_model_path)
    token_id = genir.rank_token_id(tok)
    data = genir.training_queries("PyDoc-Net", train_data.CorpusFile(mc.docs_path("PyDoc-Net", root)))
    base = genir.train_data_settings()
    genir.C.clear()
    genir.C.update(saved)
    assert len(data.groups) == N_DOCS and len({data.docs[d] for d in data.docs}) == N_DOCS  # distinct DocIDs

    def make(mode, group_size):
        s = dataclasses.replace(base, ranknet_mode=mode, group_size=group_size, batch_size=group_size, rank_every=1)
        return rank_groups.RankGroups(tok, data.bm25, data.docs, data, token_id, s)

    return make, tok, data


def _group(supplier, g):
    data = supplier.data
    row = data.row(int(data.groups[g]))
    return row, data.docs.ids[int(data.doc[int(data.groups[g])])]


def test_released_negatives_are_drawn_again_joint_ones_are_fixed(groups):
    make, _, _ = groups
    for mode in ("released", "joint"):
        supplier = make(mode, 3)
        g = max(range(N_DOCS), key=lambda g: len(supplier.candidates(g, _group(supplier, g)[0]["query"])))
        row, positive = _group(supplier, g)
        draws = {tuple(supplier.negatives(g, row["query"], positive)) for _ in range(8)}
        assert all(len(set(d)) == 2 and positive not in d for d in draws)
        assert len(draws) > 1 if mode == "released" else len(draws) == 1, (mode, draws)
        state = supplier.extra_state()  # what an epoch checkpoint keeps: a resumed run draws the same batch
        first = supplier(0)
        supplier.load_extra_state(state)
        assert torch.equal(supplier(0)["input_ids"], first["input_ids"])


def _answers(supplier, tok, batch):
    """(group, DocID) of each row of a ranking batch, found among every group's encodings."""
    gists = [supplier.docids[d] for d in supplier.docids] + [rank_groups.PAD_DOCID]
    known = {}
    for g in range(N_DOCS):
        row, _ = _group(supplier, g)
        for gist in gists:
            known[tuple(train_data.encode(tok, row, gist, supplier.settings)["input_ids"])] = (g, gist)
    return [known[tuple(ids[mask.bool()].tolist())] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def test_released_pads_a_short_group_joint_drops_or_tops_it_up(groups):
    """Too few candidates for a group: "released" fills it with PAD_DOCID rows; "joint" tops a short BM25
    list up with random documents, and has no ranking batches where the corpus has fewer DocIDs than a group."""
    make, tok, _ = groups
    released, joint = make("released", N_DOCS + 2), make("joint", N_DOCS + 2)  # more than the corpus holds
    assert joint(0) is None and not joint.active
    rows = _answers(released, tok, released(0))
    g = rows[0][0]
    assert len(rows) == N_DOCS + 2 and {r[0] for r in rows} == {g}
    assert rows[0][1] == released.docids[_group(released, g)[1]]
    real = [gist for _, gist in rows[1:] if gist != rank_groups.PAD_DOCID]
    assert len(set(real)) == len(real) <= N_DOCS - 1 and [gist for _, gist in rows[-2:]] == [rank_groups.PAD_DOCID] * 2

    for mode in ("released", "joint"):  # a BM25 list of one other document for every group
        supplier = make(mode, 4)
        for g in range(N_DOCS):
            row, positive = _group(supplier, g)
            other = next(i for i, d in enumerate(supplier.index.doc_ids) if d != positive)
            supplier.top[g] = [other] + [-1] * (supplier.top.shape[1] - 1)
            supplier.known[g] = True
        rows = _answers(supplier, tok, supplier(0))
        gists = [gist for _, gist in rows]
        assert len(rows) == 4 and gists[0] != rank_groups.PAD_DOCID
        if mode == "released":
            assert gists[2:] == [rank_groups.PAD_DOCID] * 2 and gists[1] != rank_groups.PAD_DOCID
        else:
            assert rank_groups.PAD_DOCID not in gists and len(set(gists)) == 4
