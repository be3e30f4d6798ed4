import json
import os
import pickle

import pytest

import file_io
from file_io import DataError


def test_jsonl_roundtrip_keeps_unicode_and_order(tmp_path):
    rows = [{"id": str(i), "doc": f"déjà vu {i} ✓"} for i in range(50)]
    path = tmp_path / "sub" / "docs.jsonl"
    file_io.write_jsonl(rows, str(path))
    assert file_io.read_jsonl(str(path)) == rows
    assert "déjà" in path.read_text(encoding="utf-8")


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3\n{"a": 4}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:4: malformed JSON"):
        file_io.read_jsonl(str(path))


def test_iter_jsonl_streams_lines_before_a_later_error(tmp_path):
    path = tmp_path / "late.jsonl"
    path.write_text('{"a": 1}\nnot json\n', encoding="utf-8")
    it = file_io.iter_jsonl(str(path))
    assert next(it) == {"a": 1}
    with pytest.raises(DataError, match=":2:"):
        next(it)


def test_missing_file_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    for reader in (file_io.read_jsonl, file_io.read_json, file_io.read_pkl):
        with pytest.raises(FileNotFoundError, match="nope.jsonl"):
            reader(missing)


def test_interrupted_write_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.jsonl"
    file_io.write_jsonl([{"x": 1}], str(path))

    def rows():
        yield {"x": 2}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        file_io.write_jsonl(rows(), str(path))
    assert file_io.read_jsonl(str(path)) == [{"x": 1}]
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_interrupted_first_write_leaves_nothing(tmp_path):
    path = tmp_path / "new.json"

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        file_io.write_json({"a": Unserialisable()}, str(path))
    assert not path.exists() and os.listdir(tmp_path) == []


def test_add_jsonl_appends(tmp_path):
    path = str(tmp_path / "log.jsonl")
    file_io.add_jsonl([{"i": 0}], path)
    file_io.add_jsonl([{"i": 1}, {"i": 2}], path)
    assert [r["i"] for r in file_io.read_jsonl(path)] == [0, 1, 2]


def test_json_and_pickle_roundtrip(tmp_path):
    obj = {"a": [1, 2.5, "z"], "b": {"c": None}}
    file_io.write_json(obj, str(tmp_path / "a" / "o.json"))
    assert file_io.read_json(str(tmp_path / "a" / "o.json")) == obj
    file_io.write_pkl({"t": (1, 2)}, str(tmp_path / "o.pkl"))
    assert file_io.read_pkl(str(tmp_path / "o.pkl")) == {"t": (1, 2)}
    with open(tmp_path / "o.pkl", "rb") as f:
        assert pickle.load(f) == {"t": (1, 2)}


def test_malformed_json_file_names_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{\n "a": 1,\n}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.json:3"):
        file_io.read_json(str(path))


def test_require_fields_names_file_line_and_field():
    file_io.require_fields({"a": 1, "b": 2}, ["a", "b"], "f.jsonl", 3)
    with pytest.raises(DataError, match=r"f\.jsonl:7: missing field 'doc'"):
        file_io.require_fields({"id": "1"}, ["id", "doc"], "f.jsonl", 7)


def test_all_file_and_create_dir(tmp_path):
    file_io.create_dir(str(tmp_path / "x" / "y" / "f.txt"))
    for name in ("x/y/b.txt", "x/a.txt"):
        (tmp_path / name).write_text("1")
    assert file_io.all_file(str(tmp_path)) == [str(tmp_path / "x" / "a.txt"), str(tmp_path / "x" / "y" / "b.txt")]


def test_mp_preserves_order_across_processes():
    data = ["a" * (i % 7) for i in range(40)]
    assert file_io.mp(len, data, processes=2) == [len(x) for x in data]
    assert file_io.mp(json.dumps, [1, 2], processes=1) == ["1", "2"]
