import pytest

import mair_config as mc


def test_registry_has_126_tasks_in_six_domains():
    tasks = mc.get_all_tasks()
    assert len(tasks) == len(set(tasks)) == 126
    assert set(mc.TASK_DOMAIN.values()) == set(mc.DOMAINS)
    assert sum(len(mc.get_tasks_by_domain(d)) for d in mc.DOMAINS) == 126


def test_paper_domain_names_map_to_config_names():
    assert mc.get_tasks_by_domain("Coding") == mc.get_tasks_by_domain("Code")
    assert "FinQA" in mc.get_tasks_by_domain("Financial")
    assert "CodeSearchNet" in mc.get_tasks_by_domain("Coding")
    with pytest.raises(ValueError, match="unknown domain 'Chemistry'"):
        mc.get_tasks_by_domain("Chemistry")


def test_unknown_task_is_a_clear_error_with_suggestion():
    with pytest.raises(mc.UnknownTaskError, match="unknown task 'SciFacts'.*SciFact"):
        mc.corpus_of("SciFacts")
    with pytest.raises(mc.UnknownTaskError):
        mc.task_domain("nope")


def test_shared_corpora():
    assert mc.corpus_of("ELI5") == "AY2" and mc.corpus_of("AY2") == "AY2"
    assert mc.corpus_of("PrecisionMedicine-Article_2020") == "Article_2019"
    assert mc.corpus_of("SciFact") == "SciFact"
    assert mc.tasks_of_corpus("CliniDS_2014") == ["CliniDS_2014", "CliniDS_2015", "CliniDS_2016"]
    assert mc.corpora_of(["ELI5", "Fever", "SciFact", "AY2"]) == ["AY2", "SciFact"]
    for members in mc.SHARE_CORPUS.values():
        assert all(m in mc.TASK_DOMAIN for m in members)
    assert mc.corpus_docs_path("Article_2019", root="R") == "R/MAIR-Docs/PrecisionMedicine-Article_2019/docs.jsonl"


def test_beir_and_demo_tasks_are_known():
    assert all(t in mc.TASK_DOMAIN for t in mc.BEIR_TASKS)
    assert set(mc.DEMO_TRAIN_TASKS) | set(mc.DEMO_EVAL_TASKS) | set(mc.DEMO_DEV_TASKS) == set(mc.DEMO_TASK_DOMAIN)
    assert not set(mc.DEMO_TRAIN_TASKS) & set(mc.DEMO_EVAL_TASKS) and not set(mc.DEMO_DEV_TASKS) & (
        set(mc.DEMO_TRAIN_TASKS) | set(mc.DEMO_EVAL_TASKS))
    assert mc.corpus_of("PyDoc-Net") == "PyDoc-Net"


def test_path_helpers():
    assert mc.docs_path("SciFact", "d") == "d/MAIR-Docs/SciFact/docs.jsonl"
    assert mc.queries_path("SciFact", "d") == "d/MAIR-Queries/SciFact/queries.jsonl"
    assert mc.pseudo_queries_path("AY2", "QG", 16, "d") == "d/MAIR-Data/QG-16/AY2/queries.jsonl"
    assert mc.docasq_path("AY2", 16, "d") == "d/MAIR-Data/DocAsQ-16/AY2/queries.jsonl"
    assert mc.gist_path("AY2", root="d") == "d/MAIR-Data/gist_ids/AY2/title.jsonl"
    assert mc.shard_path("d/x/title.jsonl", 3, 8) == "d/x/title-3-8.jsonl"
