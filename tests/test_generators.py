"""Query and DocID generators: shared LM plumbing, SFT, sharded generation, the vLLM seam.
The launcher's device handling is in test_launcher.py."""
import dataclasses
import json
import logging
import os
import subprocess
import sys
import types

import pytest

import data
import devices
import generation
import lm
import mair_config as mc
import qg_vllm
import sft
import shards
import sftqg
from config import parse_args
from docids import ExtractiveTeacher, normalize_docid
from file_io import DataError, read_json, read_jsonl, read_rows, write_json, write_jsonl
from prompts import GENERIC_INSTRUCTION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sft_settings(**values):
    """SFT settings for the tiny model: `values` over the scripts' usual ones."""
    return sft.SFTSettings(**{"max_steps": None, "grad_accum": 1,
                             "warmup_ratio": 0.0, "grad_clip": 1.0, "weight_decay": 0.0, "seed": 0,
                             "log_every": 10, "wandb": None, "wandb_project": "zerogr", "keep_checkpoints": 0,
                             "dist_timeout": 1800, "precision": "bf16", "ranknet_mode": "joint", **values})


@pytest.fixture()
def small_corpus(tmp_path, demo_root):
    """A 10-document task in a temporary MAIR layout, copied from a demo task."""
    docs = read_jsonl(mc.docs_path("PyDoc-Net", demo_root))[:10]
    ids = {d["id"] for d in docs}
    queries = [q for q in read_jsonl(mc.queries_path("PyDoc-Net", demo_root))
               if all(lab["id"] in ids for lab in q["labels"])]
    root = str(tmp_path / "data")
    write_jsonl(docs, mc.docs_path("PyDoc-Net", root))
    write_jsonl(queries, mc.queries_path("PyDoc-Net", root))
    return root, docs


def test_encode_example_masks_the_prompt(tiny_model_path):
    tok = lm.load_tokenizer(tiny_model_path)
    ex = lm.encode_example(tok, "find the socket", "socket close", max_len=512)
    prompt = lm.chat_prompt_ids(tok, "find the socket")
    assert ex["input_ids"][:len(prompt)] == prompt
    assert all(x == lm.IGNORE_INDEX for x in ex["labels"][:len(prompt)])
    answer = [t for t in ex["labels"] if t != lm.IGNORE_INDEX]
    assert tok.decode(answer) == "socket close" + tok.eos_token
    cut = lm.encode_example(tok, "find the socket", "socket close", max_len=len(ex["input_ids"]) - 1)
    assert len(cut["input_ids"]) == len(ex["input_ids"]) - 1  # MAX_LEN cuts the prompt's text, not the answer
    assert [t for t in cut["labels"] if t != lm.IGNORE_INDEX] == answer
    batch = lm.collate([ex, cut], tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum() == len(cut["input_ids"])


def test_sft_lowers_the_loss_and_the_checkpoint_reloads_and_generates(tmp_path, tiny_model_path, demo_root):
    rows = data.query_sft_rows(["PyCode-Text"], demo_root)[:48]
    model, tok = lm.load_model(tiny_model_path)
    examples = sftqg.encode(tok, rows)
    out = str(tmp_path / "qg")
    cfg = sft_settings(lr=3e-3, epochs=4, batch_size=16, warmup_steps=2)
    summary = sft.train_sft(model, tok, examples, out, cfg, desc="test")
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < 0.8 * losses[0]
    assert sft.training_done(out) and sft.last_checkpoint(out).endswith("checkpoint-epoch4")
    assert not os.path.exists(os.path.join(out, "checkpoint-epoch3", "optimizer.pt"))
    gen = generation.HFGenerator(out, batch_size=4)
    prompts = [lm.chat_prompt_ids(gen.tokenizer, f"prompt {i}") for i in range(3)]
    texts = gen.generate(prompts, n=2, max_tokens=8)
    assert len(texts) == 3 and all(len(t) == 2 and all(isinstance(s, str) for s in t) for t in texts)


def test_training_resumes_from_the_newest_checkpoint(tmp_path, tiny_model_path, demo_root):
    rows = data.query_sft_rows(["PyCode-Text"], demo_root)[:16]
    out = str(tmp_path / "qg")
    cfg = sft_settings(lr=1e-3, epochs=1, batch_size=8, warmup_steps=0)
    model, tok = lm.load_model(tiny_model_path)
    sft.train_sft(model, tok, sftqg.encode(tok, rows), out, cfg)
    os.remove(os.path.join(out, "training_complete.json"))
    model, tok, resume = sft.load_for_training(tiny_model_path, out, cfg.precision)
    assert resume.endswith("checkpoint-epoch1")
    summary = sft.train_sft(model, tok, sftqg.encode(tok, rows), out, dataclasses.replace(cfg, epochs=2),
                           resume_from=resume)
    assert [h["epoch"] for h in summary["history"]] == [1, 2] and summary["global_step"] == 4


def test_sft_data_builders_and_bad_lines(tmp_path, demo_root):
    qg = data.query_sft_rows(["PyCode-Text"], demo_root)
    assert qg and set(qg[0]) == {"instruction", "query", "doc", "source"} and qg[0]["source"] == "PyCode-Text"
    docid = data.docid_sft_rows(["PyCode-Text"], demo_root, None)
    assert len(docid) == len(read_jsonl(mc.docs_path("PyCode-Text", demo_root)))
    assert all(1 <= len(r["output"].split()) <= 8 for r in docid)
    teacher = tmp_path / "teacher.jsonl"
    first = read_jsonl(mc.docs_path("PyCode-Text", demo_root))[0]["id"]
    write_jsonl([{"id": first, "gist": "The Teacher's DocID, Written By GPT"}], str(teacher))
    with_teacher = data.docid_sft_rows(["PyCode-Text"], demo_root, str(teacher))
    assert with_teacher[0]["output"] == "teacher s docid written by gpt"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "i", "query": "q", "doc": "d"}\n{"instruction": "i", "doc": "d"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'query'"):
        read_rows(str(bad), ("instruction", "query", "doc"))


def test_docid_normaliser_and_teacher(demo_root):
    assert normalize_docid("The Socket: is a PD3.1 Connection!!\nignored line") == "socket pd3.1 connection"
    assert normalize_docid("a b c d e f g h i j") == "b c d e f g h i"
    assert normalize_docid("c++ parser", fill_terms=["grammar", "c++", "tokens"], min_words=4) == \
        "c++ parser grammar tokens"
    docs = [d["doc"] for d in read_jsonl(mc.docs_path("PyDoc-Net", demo_root))]
    teacher = ExtractiveTeacher(docs)
    ids = [teacher.docid(d) for d in docs]
    assert sum(len(i.split()) >= 6 for i in ids) > 0.6 * len(ids)
    assert len(set(ids)) > 0.9 * len(ids)
    assert all(i == normalize_docid(i) for i in ids)


def test_read_docs_validates(tmp_path, caplog):
    path = str(tmp_path / "MAIR-Docs" / "T" / "docs.jsonl")
    write_jsonl([{"id": 1, "doc": "x"}, {"id": "2", "doc": ""}], path)
    with caplog.at_level(logging.WARNING):
        docs = data.read_docs(path)
    assert [d["id"] for d in docs] == ["1", "2"] and "empty text" in caplog.text
    write_jsonl([{"id": "1", "doc": "x"}, {"id": "1", "doc": "y"}], path)
    with pytest.raises(DataError, match="duplicate document id '1'"):
        data.read_docs(path)
    write_jsonl([{"id": "1"}], path)
    with pytest.raises(DataError, match=r"docs\.jsonl:1: missing field 'doc'"):
        data.read_docs(path)


def test_instruction_comes_from_the_queries_file(small_corpus, caplog):
    root, _ = small_corpus
    path = mc.docs_path("PyDoc-Net", root)
    assert data.task_instruction(path).startswith("A user describes")
    os.remove(mc.queries_path("PyDoc-Net", root))
    with caplog.at_level(logging.WARNING):
        assert data.task_instruction(path) == GENERIC_INSTRUCTION
    assert "no queries file" in caplog.text


def _fake_rows(docs, per_doc):
    return [{"id": d["id"], "k": k} for d in docs for k in range(per_doc)]


def test_shards_cover_every_document_once_and_merge_checks(tmp_path, caplog):
    docs = [{"id": str(i), "doc": f"d{i}"} for i in range(11)]
    final = str(tmp_path / "title.jsonl")
    key = lambda r: r["id"]  # noqa: E731
    for pid in range(3):
        shards.generate_shard(shards.shard_docs(docs, pid, 3), mc.shard_path(final, pid, 3),
                              lambda chunk: _fake_rows(chunk, 2), 2, key, chunk_size=2)
    write_jsonl([{"id": "0", "k": 0}], mc.shard_path(final, 0, 4))
    with caplog.at_level(logging.WARNING):
        shards.merge_shards(final, 3, docs, 2, key)
    assert "another -total_num" in caplog.text
    rows = read_jsonl(final)
    assert sorted(r["id"] for r in rows) == sorted([d["id"] for d in docs] * 2, key=str)
    os.remove(final)
    os.remove(mc.shard_path(final, 1, 3))
    with pytest.raises(shards.IncompleteShards, match="1 of 3 shards missing"):
        shards.merge_shards(final, 3, docs, 2, key)
    write_jsonl(_fake_rows(shards.shard_docs(docs, 1, 3)[:-1], 2), mc.shard_path(final, 1, 3))
    with pytest.raises(shards.IncompleteShards, match="not merged"):
        shards.merge_shards(final, 3, docs, 2, key)
    assert not os.path.exists(final)


def test_killed_shard_resumes_without_duplicates_or_losses(tmp_path):
    docs = [{"id": str(i), "doc": f"d{i}"} for i in range(10)]
    out = str(tmp_path / "queries-0-1.jsonl")
    key = lambda r: r["id"]  # noqa: E731
    calls = []

    def dies_after_two_chunks(chunk):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append([d["id"] for d in chunk])
        return _fake_rows(chunk, 3)

    with pytest.raises(KeyboardInterrupt):
        shards.generate_shard(docs, out, dies_after_two_chunks, 3, key, chunk_size=3)
    assert not os.path.exists(out)
    with open(out + ".partial", "a") as f:
        f.write('{"id": "6", "k"')  # a line cut by the kill
    calls.clear()
    shards.generate_shard(docs, out, lambda chunk: calls.append([d["id"] for d in chunk]) or _fake_rows(chunk, 3),
                          3, key, chunk_size=3)
    assert [i for c in calls for i in c] == [str(i) for i in range(6, 10)]
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [str(i) for i in range(10) for _ in range(3)]
    assert not os.path.exists(out + ".partial")


class _FakeVLLM(types.ModuleType):
    """A stand-in for the vllm package: records what the backend asks for."""

    def __init__(self):
        super().__init__("vllm")
        self.calls = {}
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                fake.calls["sampling"] = kwargs
                self.n = kwargs["n"]

        class LLM:
            def __init__(self, **kwargs):
                fake.calls["llm"] = kwargs

            def generate(self, prompts, params):
                fake.calls["prompts"] = prompts
                return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" q{i}-{k} ") for k in range(params.n)])
                        for i in range(len(prompts))]

        self.SamplingParams, self.LLM = SamplingParams, LLM


def test_vllm_backend_is_chosen_on_gpu_and_gets_the_sampling_settings(small_corpus, tiny_model_path, monkeypatch):
    root, docs = small_corpus
    fake = _FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(devices, "gpu_available", lambda: True)
    monkeypatch.setattr(lm, "cuda_available", lambda: pytest.fail("CUDA initialised before vLLM"))
    monkeypatch.setattr(lm, "has_package", lambda name: name == "vllm")
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.setitem(qg_vllm.C, "DATA_ROOT", root)
    out = qg_vllm.gen(mc.docs_path("PyDoc-Net", root), "PyDoc-Net", 1, 2, "QG", tiny_model_path, 3)
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert fake.calls["sampling"] == {"n": 3, "temperature": 1.0, "max_tokens": 64, "top_p": 1.0}
    assert fake.calls["llm"]["model"] == tiny_model_path and fake.calls["llm"]["dtype"] == "bfloat16"
    assert "gpu_memory_utilization" not in fake.calls["llm"]  # unset: vLLM's own default, one engine per GPU
    tok = lm.load_tokenizer(tiny_model_path)
    assert fake.calls["prompts"][0]["prompt_token_ids"][0] == tok.bos_token_id
    assert tok.decode(fake.calls["prompts"][0]["prompt_token_ids"]).count(tok.bos_token) == 1
    rows = read_jsonl(out)
    assert out.endswith("MAIR-Data/QG-3/PyDoc-Net/queries-1-2.jsonl")
    assert [r["labels"][0]["id"] for r in rows] == [d["id"] for d in docs[1::2] for _ in range(3)]
    assert rows[0]["query"] == "q0-0" and rows[0]["instruction"].startswith("A user describes")


def test_backend_choice_without_a_gpu(tiny_model_path, monkeypatch):
    fake = _FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(lm, "has_package", lambda name: name == "vllm")
    monkeypatch.setattr(devices, "gpu_available", lambda: False)
    assert generation.make_generator(tiny_model_path, batch_size=2).name == "transformers"  # vLLM installed, no GPU
    assert "llm" not in fake.calls
    assert generation.make_generator(tiny_model_path, backend="vllm", seed=5, gpu_memory_utilization=0.3).name == "vllm"
    assert fake.calls["llm"] == {"model": tiny_model_path, "dtype": "float32", "seed": 5, "max_model_len": 1024,
                                 "gpu_memory_utilization": 0.3}  # a CPU build of vLLM


def test_launcher_runs_shards_merges_and_skips_finished(small_corpus, tiny_model_path, tmp_path):
    root, docs = small_corpus
    config = str(tmp_path / "cfg.json")
    write_json({"title_vllm": {"MODEL_NAME": tiny_model_path, "TASKS": ["PyDoc-Net"], "TOTAL_NUM": 2,
                               "DATA_ROOT": root, "MAX_TOKENS": 8, "LOG_DIR": str(tmp_path / "log"),
                               "NORMALIZE_DOCIDS": True}}, config)
    cmd = [sys.executable, "title_vllm.py", "--config", config]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = read_jsonl(mc.gist_path("PyDoc-Net", root=root))
    assert [r["id"] for r in rows] == [d["id"] for d in docs[0::2]] + [d["id"] for d in docs[1::2]]
    assert all(r["gist"] and r["gist"] == normalize_docid(r["gist"]) for r in rows)
    report = mc.gist_path("PyDoc-Net", root=root)[:-len(".jsonl")] + ".quality.json"
    figures = read_json(report)
    assert figures["final"]["documents"] == len(docs) and 0 <= figures["raw"]["collision_rate"] <= 1
    assert figures["final"]["in_document_share"] > 0.5  # the normaliser keeps words derivable from the document
    written = os.path.getmtime(report)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "exists, skipped" in again.stderr
    assert os.path.getmtime(report) == written  # figures of an unchanged output are not recomputed


def test_two_process_training_under_accelerate_launch(tmp_path, tiny_model_path, demo_root):
    """`accelerate launch --cpu` alone starts one process; the multi-process CPU form must give 2."""
    out = str(tmp_path / "qg2")
    config = str(tmp_path / "cfg.json")
    rows = data.query_sft_rows(["PyCode-Text"], demo_root)[:32]
    write_jsonl(rows, str(tmp_path / "sft.jsonl"))
    write_json({"sftqg": {"BASE_MODEL": tiny_model_path, "OUT_DIR": out, "SFT_DATA": str(tmp_path / "sft.jsonl"),
                          "EPOCHS": 1, "BATCH_SIZE": 4, "WARMUP_STEPS": 1, "LR": 1e-3}}, config)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "sftqg.py", "--config", config]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    with open(os.path.join(out, "training_complete.json")) as f:
        summary = json.load(f)
    assert summary["num_processes"] == 2
    assert summary["global_step"] == 4  # 32 examples / (4 per device x 2 processes)


def test_config_overrides_and_original_flags(tmp_path):
    constants = {"NUM_Q": 16, "TASKS": ["a"], "LR": 5e-5}
    config = str(tmp_path / "c.json")
    write_json({"qg_vllm": {"NUM_Q": 4}, "sftqg": {"LR": 1.0}}, config)
    args = parse_args("qg_vllm", constants, [("pid", int, 0), ("data_name", str, "")],
                      ["--config", config, "--TASKS=['x','y']", "--lr", "0.1", "-pid", "3", "-data_name", "AY2"])
    assert constants == {"NUM_Q": 4, "TASKS": ["x", "y"], "LR": 0.1}
    assert args.pid == 3 and args.data_name == "AY2"
    with pytest.raises(SystemExit, match="unknown setting 'NUMQ'"):
        parse_args("qg_vllm", constants, argv=["--NUMQ=3"])
