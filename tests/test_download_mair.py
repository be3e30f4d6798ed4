"""The MAIR download helper's conversion, on a small local dataset (no network)."""
import pytest
from datasets import Dataset, DatasetDict

import mair_config as mc
from dataset import download_mair
from file_io import DataError, read_jsonl


def _queries(n):
    return [{"qid": i, "instruction": "Find it.", "query": f"q{i}", "labels": [{"id": 10 + i, "score": 2}]}
            for i in range(n)]


def test_save_task_writes_main_and_extra_splits(tmp_path):
    queries = DatasetDict({"queries": Dataset.from_list(_queries(3)),
                           "extra_queries": Dataset.from_list(_queries(1))})
    docs = DatasetDict({"docs": Dataset.from_list([{"id": 10 + i, "doc": f"text {i}"} for i in range(3)]),
                        "extra_docs": Dataset.from_list([{"id": 10, "doc": "other"}])})
    written = download_mair.save_task("SciFact", queries, docs, root=str(tmp_path))
    assert len(written) == 4
    rows = read_jsonl(mc.queries_path("SciFact", str(tmp_path)))
    assert rows[1] == {"qid": "1", "instruction": "Find it.", "query": "q1", "labels": [{"id": "11", "score": 2}]}
    assert read_jsonl(mc.docs_path("SciFact", str(tmp_path)))[2] == {"id": "12", "doc": "text 2"}
    extra = tmp_path / "MAIR-Docs" / "SciFact" / "extra_docs.jsonl"
    assert read_jsonl(str(extra)) == [{"id": "10", "doc": "other"}]


def test_missing_field_and_missing_split_are_errors(tmp_path):
    bad = DatasetDict({"queries": Dataset.from_list([{"qid": 1, "query": "q"}])})
    docs = DatasetDict({"docs": Dataset.from_list([{"id": 1, "doc": "d"}])})
    with pytest.raises(DataError, match=r"SciFact/queries\[0\]: missing field 'labels'"):
        download_mair.save_task("SciFact", bad, docs, root=str(tmp_path))
    with pytest.raises(DataError, match="no 'docs' split"):
        download_mair.save_task("SciFact", DatasetDict({"queries": Dataset.from_list(_queries(1))}),
                                DatasetDict({"corpus": Dataset.from_list([{"id": 1, "doc": "d"}])}),
                                root=str(tmp_path))


def test_download_rejects_unknown_task(tmp_path):
    with pytest.raises(mc.UnknownTaskError):
        download_mair.download(["NotATask"], root=str(tmp_path))
