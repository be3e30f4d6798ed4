"""Faults: training killed (at an epoch boundary, inside an epoch, while saving) and resumed ends as an
uninterrupted run; checkpoint and shard permissions; a killed generation shard resumes to the same
bytes; finished shard files are reused; shard processes end with their launcher.

Also imported by the subprocesses it starts (train() below), so heavy modules are imported lazily."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import lm
import mair_config as mc
import sft
import shards
from file_io import read_json, read_jsonl, write_jsonl
from small_corpus import write_small_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = {"max_steps": None, "lr": 3e-3, "epochs": 3, "batch_size": 8, "grad_accum": 1, "warmup_steps": 2,
       "warmup_ratio": 0.0, "grad_clip": 1.0, "weight_decay": 0.0, "seed": 0, "log_every": 10, "wandb": None,
       "wandb_project": "zerogr",
       "keep_checkpoints": 0, "dist_timeout": 1800, "precision": "bf16", "ranknet_mode": "joint"}
STEPS = 15  # 40 examples / 8 per batch x 3 epochs
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.dirname(os.path.abspath(__file__))]),
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}


# ---------------------------------------------------------------------------------------------- training

def examples(tokenizer):
    docs = read_jsonl(mc.docs_path("PyCode-Text", mc.DATA_ROOT))[:40]
    return [lm.encode_example(tokenizer, lm.truncate_words(d["doc"], 40), lm.truncate_words(d["doc"], 6), 96)
            for d in docs]


class NoisyBatches(sft.SeededBatches):
    """Every other step a batch of 4 examples drawn by its own generator; SIGKILLs this process at
    step `kill_step`."""

    def __init__(self, examples, pad_id, kill_step=None):
        self.rng, self.examples, self.pad_id, self.kill_step = random.Random(7), examples, pad_id, kill_step

    def __call__(self, step):
        if step == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return None if step % 2 else lm.collate(self.rng.sample(self.examples, 4), self.pad_id)


def noisy_loss(model, batch):
    """The LM loss of the extra batch, weighted by draws from python's, numpy's and torch's generators."""
    weight = random.random() + float(np.random.rand()) + torch.rand(()).item()
    return weight * sft.SFTModule(model)(**batch)


def train(out, base, epochs=3, kill_step=None, kill_in_save=None):
    """Train (or resume) into `out`; SIGKILL at `kill_step` or while writing checkpoint `kill_in_save`."""
    if kill_in_save:
        save = torch.save

        def dying_save(obj, path):
            if f"epoch{kill_in_save}.tmp" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            save(obj, path)

        torch.save = dying_save
    model, tok, resume = sft.load_for_training(base, out, CFG["precision"])
    ex = examples(tok)
    return sft.train_sft(model, tok, ex, out, sft.SFTSettings(**{**CFG, "epochs": epochs}), extra_loss=noisy_loss,
                        extra_batches=NoisyBatches(ex, tok.pad_token_id, kill_step), resume_from=resume)


def final_state(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "model.safetensors"))


def same_run(out_a, out_b):
    """Assert two training outputs hold the same weights and the same loss history."""
    a, b = final_state(out_a), final_state(out_b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [[(h["epoch"], h["loss"], h["steps"]) for h in summary(out)["history"]] for out in (out_a, out_b)]
    assert history[0] == history[1]
    return history[0]


def summary(out):
    return read_json(os.path.join(out, "training_complete.json"))


def scramble_random_states():
    """What a new process would bring: other global random states."""
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_path, one_thread):
    out = str(tmp_path_factory.mktemp("faults") / "uninterrupted")
    train(out, tiny_model_path)
    return out


def test_resume_at_an_epoch_boundary_is_exact_and_outputs_follow_the_umask(uninterrupted, tiny_model_path, tmp_path):
    out = str(tmp_path / "resumed")
    old = os.umask(0o002)
    try:
        train(out, tiny_model_path, epochs=1)  # as a 3-epoch run killed after its first epoch
        os.remove(os.path.join(out, "training_complete.json"))
        scramble_random_states()
        summary = train(out, tiny_model_path)
    finally:
        os.umask(old)
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    history = same_run(uninterrupted, out)
    print("loss history (uninterrupted == resumed):", history)
    for root, dirs, files in os.walk(out):
        assert oct(os.stat(root).st_mode & 0o777) == oct(0o775), root
        for name in files:
            assert oct(os.stat(os.path.join(root, name)).st_mode & 0o777) == oct(0o664), os.path.join(root, name)


@pytest.mark.parametrize("seed, kill_in_save", [(1, None), (4, None), (0, 2)])
def test_training_killed_anywhere_resumes_to_the_uninterrupted_weights(uninterrupted, tiny_model_path, tmp_path,
                                                                       seed, kill_in_save, caplog):
    out = str(tmp_path / "killed")
    kill_step = None if kill_in_save else random.Random(seed).randrange(1, STEPS)
    code = (f"import test_faults_resume as t; t.train({out!r}, {tiny_model_path!r}, kill_step={kill_step}, "
            f"kill_in_save={kill_in_save})")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    if kill_in_save:
        assert os.path.isdir(os.path.join(out, f"checkpoint-epoch{kill_in_save}.tmp"))
    scramble_random_states()
    train(out, tiny_model_path)
    same_run(uninterrupted, out)
    if kill_in_save:
        assert f"removing checkpoint-epoch{kill_in_save}.tmp" in caplog.text
        assert not any(d.endswith(".tmp") for d in os.listdir(out))


def test_leftover_temporary_checkpoint_is_removed_and_named(tmp_path, caplog):
    out = tmp_path / "run"
    for name in ("checkpoint-epoch1", "checkpoint-epoch10", "checkpoint-epoch2.tmp"):
        (out / name).mkdir(parents=True)
        (out / name / "trainer_state.json").write_text("{}")
    (out / "checkpoint-epoch3").mkdir()  # no trainer_state.json: not a checkpoint
    assert sft.last_checkpoint(str(out)).endswith("checkpoint-epoch10")
    assert "removing checkpoint-epoch2.tmp" in caplog.text
    assert sorted(os.listdir(out)) == ["checkpoint-epoch1", "checkpoint-epoch10", "checkpoint-epoch3"]


def _genir_corpus(root, demo_root, n_docs, num_q):
    """One corpus with teacher DocIDs and, as its pseudo-queries, its documents' real queries."""
    task = "PyDoc-Net"
    docs = [d for d in read_jsonl(mc.docs_path(task, demo_root)) if len(d["doc"].split()) > 20][:n_docs]
    write_small_corpus(root, demo_root, task, docs, num_q)
    return task


@pytest.mark.parametrize("settings", ["default", "demo"])
def test_genir_with_the_ranking_loss_resumes_exactly(settings, tmp_path, demo_root, tiny_model_path, one_thread):
    import genir

    with open(os.path.join(ROOT, "configs", "demo.json")) as f:
        demo = json.load(f)["genir"]
    saved = dict(genir.C)
    overrides = {**(demo if settings == "demo" else {}), "BASE_MODEL": tiny_model_path, "TASKS": ["PyDoc-Net"],
                 "DATA_ROOT": str(tmp_path / "data"), "EPOCHS": 3, "MAX_STEPS": None, "RANK_LOSS": True}
    genir.C.update(overrides)
    assert genir.C["RANK_LOSS"]
    corpus = _genir_corpus(genir.C["DATA_ROOT"], demo_root, 8 if settings == "default" else 40, genir.C["NUM_Q"])
    try:
        genir.C["MODEL_DIR"] = str(tmp_path / "uninterrupted")
        whole = genir.train_corpus(corpus)
        genir.C.update(MODEL_DIR=str(tmp_path / "resumed"), EPOCHS=1)
        resumed = genir.train_corpus(corpus)
        os.remove(os.path.join(resumed, "training_complete.json"))
        genir.C["EPOCHS"] = 3
        scramble_random_states()
        genir.train_corpus(corpus)
        steps = summary(whole)["global_step"]
        assert any(step % genir.C["RANK_EVERY"] == 0 for step in range(steps // 3, steps)), steps  # drawn after the resume
        same_run(whole, resumed)
    finally:
        genir.C.clear()
        genir.C.update(saved)


# ---------------------------------------------------------------------------------------------- generation

def _small_corpus(root, demo_root):
    docs = read_jsonl(mc.docs_path("PyDoc-Net", demo_root))[:10]
    write_jsonl(docs, mc.docs_path("PyDoc-Net", root))
    return docs


def test_killed_generation_shard_resumes_to_the_same_bytes(tmp_path, demo_root, tiny_model_path, one_thread,
                                                           monkeypatch):
    """SIGKILL a qg_vllm.py shard process at random points, rerun it: every document once, and the
    shard byte-identical to an uninterrupted run's (the transformers backend reseeds at each chunk)."""
    import qg_vllm

    settings = {"CHUNK_DOCS": 2, "MAX_TOKENS": 8, "BATCH_SIZE": 4, "BACKEND": "transformers"}
    for key, value in settings.items():
        monkeypatch.setitem(qg_vllm.C, key, value)

    def shard(root):
        return mc.shard_path(mc.pseudo_queries_path("PyDoc-Net", "QG", 2, root), 0, 1)

    def run_in_process(root):
        monkeypatch.setitem(qg_vllm.C, "DATA_ROOT", root)
        return qg_vllm.gen(mc.docs_path("PyDoc-Net", root), "PyDoc-Net", 0, 1, "QG", tiny_model_path, 2)

    clean = str(tmp_path / "clean")
    docs = _small_corpus(clean, demo_root)
    with open(run_in_process(clean), "rb") as f:
        expected = f.read()
    for seed in (0, 1, 2):
        root = str(tmp_path / f"killed{seed}")
        _small_corpus(root, demo_root)
        rng = random.Random(seed)
        target, delay = rng.randrange(2 * len(docs)), rng.uniform(0, 0.05)
        cmd = [sys.executable, "qg_vllm.py", "-pid", "0", "-total_num", "1", "-docs_path",
               mc.docs_path("PyDoc-Net", root), "-data_name", "PyDoc-Net", "-model_name", tiny_model_path,
               "-model_sufix", "QG", "-num_q", "2", f"--DATA_ROOT={root}",
               *(f"--{k}={v}" for k, v in settings.items())]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        partial = shard(root) + ".partial"
        while proc.poll() is None and not (os.path.exists(partial) and _lines(partial) >= target):
            time.sleep(0.005)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        print(f"seed {seed}: killed with {_lines(partial) if os.path.exists(partial) else 0} rows generated")
        rows = read_jsonl(run_in_process(root))
        assert [r["labels"][0]["id"] for r in rows] == [d["id"] for d in docs for _ in range(2)]
        with open(shard(root), "rb") as f:
            assert f.read() == expected


def _lines(path):
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def test_shard_killed_inside_a_chunk_regenerates_that_whole_chunk(tmp_path):
    """A generator whose rows depend on the whole chunk (as sampled text does on its batch) gives the
    same shard after a kill that left part of a chunk written."""
    docs = [{"id": str(i), "doc": f"d{i}"} for i in range(7)]

    def generate(chunk):
        return [{"id": d["id"], "k": k, "chunk": [c["id"] for c in chunk]} for d in chunk for k in range(2)]

    whole = shards.generate_shard(docs, str(tmp_path / "whole.jsonl"), generate, 2, lambda r: r["id"], chunk_size=3)
    out = str(tmp_path / "killed.jsonl")
    write_jsonl(read_jsonl(whole)[:9], out + ".partial")  # chunk 0, document 3 and half of document 4
    calls = []
    shards.generate_shard(docs, out, lambda chunk: calls.append(len(chunk)) or generate(chunk), 2, lambda r: r["id"],
                          chunk_size=3)
    assert calls == [3, 1]
    with open(whole, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()


def test_complete_shard_file_is_kept_and_a_stale_one_refused(tmp_path):
    docs = [{"id": str(i), "doc": f"d{i}"} for i in range(5)]
    out = str(tmp_path / "title-0-1.jsonl")
    write_jsonl([{"id": d["id"], "k": 0} for d in docs], out)
    before = os.stat(out).st_mtime_ns
    assert shards.generate_shard(docs, out, lambda chunk: pytest.fail("regenerated"), 1, lambda r: r["id"]) == out
    assert os.stat(out).st_mtime_ns == before
    with pytest.raises(shards.IncompleteShards, match="title-0-1.jsonl: holds 5 documents"):
        shards.generate_shard(docs + [{"id": "5", "doc": "d5"}], out, lambda chunk: [], 1, lambda r: r["id"])


# A shard process stand-in: records each start, writes its documents' rows.
COUNTING_SHARD = r"""
import json, os, sys
argv = sys.argv[1:]
flag = lambda name: argv[argv.index(name) + 1]
pid, total, work = int(flag("-pid")), int(flag("-total_num")), flag("--work")
open(os.path.join(work, "starts"), "a").write(f"{pid}\n")
docs = [json.loads(line) for line in open(flag("-docs_path"))][pid::total]
with open(os.path.join(work, "PyDoc-Net", f"title-{pid}-{total}.jsonl"), "w") as f:
    f.writelines(json.dumps({"id": d["id"], "gist": f"g{pid}"}) + "\n" for d in docs)
"""


def test_launcher_rerun_reuses_finished_shards_for_the_merge(tmp_path, monkeypatch, caplog):
    import devices

    work = tmp_path / "work"
    (work / "PyDoc-Net").mkdir(parents=True)
    docs = [{"id": f"d{i}", "doc": f"text {i}"} for i in range(7)]
    root = str(tmp_path / "data")
    write_jsonl(docs, mc.corpus_docs_path("PyDoc-Net", root))
    script = tmp_path / "counting_shard.py"
    script.write_text(COUNTING_SHARD)
    monkeypatch.setattr(devices, "machine_gpus", lambda: [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    run = shards.Launch(tasks=["PyDoc-Net"], total_num=2, pid_start=0, pid_end=None, merge_only=False,
                        gpu_memory_utilization=None, data_root=root, log_dir=str(tmp_path / "log"),
                        quality_docs=0, seed=0)
    final = str(work / "PyDoc-Net" / "title.jsonl")

    def launch():
        return shards.launch_all(str(script), run, ["--work", str(work)], lambda corpus: final, 1, lambda r: r["id"])

    assert launch() == [] and os.path.exists(final)
    os.remove(final)  # as a launcher killed after its shards finished, before the merge
    paths = [mc.shard_path(final, pid, 2) for pid in range(2)]
    before = [(os.stat(p).st_mtime_ns, open(p).read()) for p in paths]
    with caplog.at_level("INFO"):
        assert launch() == []
    assert "shard(s) 0-1 already done, kept" in caplog.text
    assert (work / "starts").read_text().split() == ["0", "1"]  # no shard started again
    assert [(os.stat(p).st_mtime_ns, open(p).read()) for p in paths] == before
    assert read_jsonl(final) == [row for p in paths for row in read_jsonl(p)]


# A launcher on two sleeping stand-in shards; each writes its pid and sleeps.
SLEEPER = r"""
import os, sys, time
argv = sys.argv[1:]
work, pid = argv[argv.index("--work") + 1], argv[argv.index("-pid") + 1]
print("shard", pid, "started", flush=True)
with open(os.path.join(work, f"child-{pid}.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.replace(os.path.join(work, f"child-{pid}.tmp"), os.path.join(work, f"child-{pid}.pid"))
time.sleep(60)
"""
LAUNCHER = r"""
import os, sys
import shards
work = sys.argv[1]
shards.launch(os.path.join(work, "sleeper.py"), ["C"], 2, [0, 1], [None, None], lambda c: ["--work", work],
              lambda c: os.path.join(work, "out.jsonl"), lambda c: os.path.join(work, "docs.jsonl"), 1,
              lambda r: r["id"], log_dir=os.path.join(work, "log"))
"""


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _start_launcher(work):
    for pid in (0, 1):
        if os.path.exists(os.path.join(work, f"child-{pid}.pid")):
            os.remove(os.path.join(work, f"child-{pid}.pid"))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, work], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    paths = [os.path.join(work, f"child-{pid}.pid") for pid in (0, 1)]
    while not all(os.path.exists(p) for p in paths):
        assert time.time() < deadline and launcher.poll() is None, "the shard processes did not start"
        time.sleep(0.05)
    children = [int(open(p).read()) for p in paths]
    assert all(_alive(c) for c in children)
    return launcher, children


def _gone_within(children, seconds=5):
    deadline = time.time() + seconds
    while any(_alive(c) for c in children) and time.time() < deadline:
        time.sleep(0.05)
    return not any(_alive(c) for c in children)


def test_shard_processes_end_with_the_launcher_and_reruns_append_to_their_logs(tmp_path):
    work = str(tmp_path)
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    write_jsonl([{"id": "a", "doc": "x"}, {"id": "b", "doc": "y"}], os.path.join(work, "docs.jsonl"))
    launcher, children = _start_launcher(work)
    launcher.kill()
    launcher.wait()
    assert _gone_within(children), "shard processes outlived a SIGKILLed launcher"
    launcher, children = _start_launcher(work)
    launcher.terminate()
    assert launcher.wait(15) == 128 + signal.SIGTERM
    assert _gone_within(children), "shard processes outlived a SIGTERMed launcher"
    for pid in (0, 1):
        text = (tmp_path / "log" / f"sleeper-C-{pid}-2.log").read_text()
        assert text.count("==== ") == 2 and text.count(f"shard {pid} started") == 2, text
