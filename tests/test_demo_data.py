"""The offline demo corpus and the tiny model built from it."""
import hashlib
import os

import pytest

import mair_config as mc
from dataset import build_demo
from file_io import read_jsonl


def _load(task, root):
    return read_jsonl(mc.docs_path(task, root)), read_jsonl(mc.queries_path(task, root))


@pytest.mark.parametrize("task", list(mc.DEMO_TASK_DOMAIN))
def test_task_is_a_valid_mair_task(demo_root, task):
    docs, queries = _load(task, demo_root)
    assert (150 if task in mc.DEMO_DEV_TASKS else 250) <= len(docs) <= 1000
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids)) and all(d["doc"].strip() for d in docs)
    assert len(queries) >= 0.8 * len(docs)
    labelled = {lab["id"] for q in queries for lab in q["labels"]}
    assert labelled == set(ids)
    assert len({q["instruction"] for q in queries}) == 1
    assert all(len(q["query"].split()) >= build_demo.MIN_QUERY_WORDS for q in queries)


@pytest.mark.parametrize("task", list(mc.DEMO_TASK_DOMAIN))
def test_query_text_is_not_copied_into_its_document(demo_root, task):
    docs, queries = _load(task, demo_root)
    by_id = {d["id"]: d["doc"] for d in docs}
    leaked = sum(q["query"] in by_id[lab["id"]] for q in queries for lab in q["labels"])
    # development tasks only choose settings: 10 turtle methods there repeat their first sentence (3.9%)
    assert leaked <= (0.04 if task in mc.DEMO_DEV_TASKS else 0.02) * len(queries)


def test_kinds_of_documents(demo_root):
    docs, _ = _load("PyDoc-Net", demo_root)
    assert all(d["doc"].startswith(d["id"] + "(") for d in docs)
    docs, _ = _load("PyCode-Dev", demo_root)
    assert all(d["doc"].lstrip().startswith(("def ", "async def ", "@")) for d in docs)
    assert sum('"""' in d["doc"] for d in docs) < 0.05 * len(docs)


def test_evaluation_modules_are_unseen_in_training():
    train = {m for t in mc.DEMO_TRAIN_TASKS for m in build_demo.DEMO_TASKS[t][1]}
    evaluation = {m for t in mc.DEMO_EVAL_TASKS for m in build_demo.DEMO_TASKS[t][1]}
    development = {m for t in mc.DEMO_DEV_TASKS for m in build_demo.DEMO_TASKS[t][1]}
    assert not train & evaluation and not development & (train | evaluation)
    assert {build_demo.DEMO_TASKS[t][0] for t in mc.DEMO_DEV_TASKS} == {build_demo.DOC_LOOKUP, build_demo.CODE_SEARCH}
    assert {build_demo.DEMO_TASKS[t][0] for t in mc.DEMO_EVAL_TASKS} == {build_demo.DOC_LOOKUP, build_demo.CODE_SEARCH}


def test_split_first_sentence_and_strip_docstring():
    first, rest = build_demo.split_first_sentence("""Return the sum, e.g. 1 + 2. Works on ints.

        More text here.
        """)
    assert first == "Return the sum, e.g. 1 + 2." and rest == "Works on ints.\nMore text here."
    src = 'def f(x):\n    """Doc string.\n\n    More."""\n    return x + 1\n'
    assert build_demo.strip_docstring(src) == "def f(x):\n    return x + 1\n"
    assert build_demo.strip_docstring('def g():\n    """Only a docstring."""\n') is None


def test_build_is_deterministic(tmp_path, demo_root):
    build_demo.build(root=str(tmp_path))
    for task in mc.DEMO_TASK_DOMAIN:
        for path in (mc.docs_path, mc.queries_path):
            with open(path(task, str(tmp_path)), "rb") as a, open(path(task, demo_root), "rb") as b:
                assert hashlib.md5(a.read()).digest() == hashlib.md5(b.read()).digest()


def test_tiny_model_loads_offline_with_llama3_chat_layout(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "find the socket"},
                                   {"role": "assistant", "content": "socket close"}],
                                  tokenize=True, return_dict=False)
    text = tok.decode(ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert text.endswith("assistant<|end_header_id|>\n\nsocket close<|eot_id|>")
    assert ids.count(tok.eos_token_id) == 2 and ids[0] == tok.bos_token_id
    gen = model.generation_config
    assert tok.eos_token_id in gen.eos_token_id and gen.pad_token_id == tok.pad_token_id
    assert "<|reserved_special_token_0|>" in tok.get_vocab()


def test_tiny_model_build_is_deterministic(tmp_path, tiny_model_path):
    from models import build_tiny
    build_tiny.build(out_dir=str(tmp_path))
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        with open(tmp_path / name, "rb") as a, open(os.path.join(tiny_model_path, name), "rb") as b:
            assert a.read() == b.read(), name
