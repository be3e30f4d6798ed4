"""Bad input is named where it happened (file and physical line) and nothing is silently lost."""
import logging
import os
import stat

import pytest

import data
import file_io
import mair_config as mc
import metrics
import sft
import sftid
import sftqg
from file_io import DataError
from prompts import GENERIC_INSTRUCTION


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


# ----------------------------------------------------------------------------- physical line numbers

BLANKS_THEN_BAD = '{"id": "1", "doc": "a"}\n\n\n{"id": "2", "doc": "b"}\n   \n\n{"id": "3"}\n'


def test_errors_name_the_physical_line_after_blank_lines(tmp_path):
    path = _write(tmp_path / "docs.jsonl", BLANKS_THEN_BAD)
    assert [n for n, _ in file_io.iter_jsonl(path, with_lines=True)] == [1, 4, 7]
    with pytest.raises(DataError, match=r"docs\.jsonl:7: missing field 'doc'"):
        file_io.read_rows(path, ("id", "doc"))
    with pytest.raises(DataError, match=r"docs\.jsonl:7: missing field 'doc'"):
        list(file_io.iter_rows(path, ("id", "doc")))
    with pytest.raises(DataError, match=r"docs\.jsonl:7: missing field 'doc'"):
        data.read_docs(path)
    bad_json = _write(tmp_path / "q.jsonl", BLANKS_THEN_BAD.replace('{"id": "3"}', '{"id": "3"'))
    with pytest.raises(DataError, match=r"q\.jsonl:7: malformed JSON"):
        file_io.read_jsonl(bad_json)
    not_object = _write(tmp_path / "o.jsonl", BLANKS_THEN_BAD.replace('{"id": "3"}', '["3"]'))
    with pytest.raises(DataError, match=r"o\.jsonl:7: expected a JSON object, got list"):
        file_io.read_rows(not_object, ())


def test_qrels_errors_name_the_physical_line(tmp_path):
    path = _write(tmp_path / "queries.jsonl", '{"qid": "a", "query": "x", "labels": []}\n\n\n'
                  '{"qid": "b", "query": "y", "labels": [{"id": "d1"}]}\n')
    numbered = list(file_io.iter_rows(path, ("qid", "labels")))
    rows, lines = [r for _, r in numbered], [n for n, _ in numbered]
    with pytest.raises(DataError, match=r"queries\.jsonl:4: label .* needs an 'id' and an integer 'score'"):
        data.qrels_from_queries(rows, source=path, lines=lines)
    rows[1] = rows[0]
    with pytest.raises(DataError, match=r"queries\.jsonl:4: duplicate qid 'a'"):
        data.qrels_from_queries(rows, source=path, lines=lines)


# ----------------------------------------------------------------------------- non-UTF-8 bytes

def test_non_utf8_byte_names_file_line_and_column(tmp_path):
    path = _write(tmp_path / "docs.jsonl", '{"id": "1", "doc": "é"}\n\n'.encode() + b'{"id": "2", "doc": "\xc3\xa9\xff"}\n')
    with pytest.raises(DataError, match=r"docs\.jsonl:3: not valid UTF-8 \(byte 0xff at column 22\)"):
        file_io.read_jsonl(path)
    with pytest.raises(DataError, match=r"docs\.jsonl:3: not valid UTF-8"):
        file_io.read_rows(path, ("id", "doc"))
    config = _write(tmp_path / "c.json", b'{\n "a": "\xfe"\n}\n')
    with pytest.raises(DataError, match=r"c\.json:2: not valid UTF-8 \(byte 0xfe at column 8\)"):
        file_io.read_json(config)
    run = _write(tmp_path / "r.trec", b"q1 Q0 d1 1 0.5 t\nq1 Q0 d\x80 2 0.4 t\n")
    with pytest.raises(DataError, match=r"r\.trec:2: not valid UTF-8 \(byte 0x80 at column 8\)"):
        metrics.read_trec_run(run)


# ----------------------------------------------------------------------------- empty SFT rows

def test_sft_rows_with_empty_fields_are_skipped_with_one_warning(tmp_path, caplog):
    rows = [{"instruction": "i", "query": "q", "doc": "d"}, {"instruction": "i", "query": " ", "doc": "d"},
            {"instruction": "i", "query": "q", "doc": ""}, {"instruction": "i", "query": None, "doc": "d"},
            {"instruction": "i", "query": "q2", "doc": "d"}, {"instruction": "i", "query": "", "doc": "d"}]
    path = str(tmp_path / "qg.jsonl")
    file_io.write_jsonl(rows, path)
    with caplog.at_level(logging.WARNING, logger="file_io"):
        kept = file_io.read_or_build_rows(path, ("instruction", "query", "doc"), list, nonempty=("query", "doc"))
    assert [r["query"] for r in kept] == ["q", "q2"]
    assert len(caplog.records) == 1
    assert "qg.jsonl: 4 row(s) with an empty query or doc skipped (line 2, 3, 4, ...)" in caplog.text
    file_io.write_jsonl(rows[1:4], path)
    with pytest.raises(DataError, match=r"qg\.jsonl: no usable rows \(3 with an empty query or doc\)"):
        file_io.read_rows(path, ("instruction", "query", "doc"), nonempty=("query", "doc"))


def test_sft_data_missing_and_nothing_built_is_an_error(tmp_path):
    with pytest.raises(DataError, match="missing and building it gave no rows"):
        file_io.read_or_build_rows(str(tmp_path / "none.jsonl"), ("input",), list)


@pytest.mark.parametrize("script, rows, message", [
    (sftqg, [{"instruction": "i", "query": "", "doc": "d"}, {"instruction": "i", "query": "q", "doc": "d"}],
     "1 row(s) with an empty query or doc skipped (line 1)"),
    (sftid, [{"instruction": "r", "input": "d", "output": "id"}, {"instruction": "r", "input": "d", "output": ""}],
     "1 row(s) with an empty input or output skipped (line 2)"),
])
def test_sft_scripts_train_only_on_nonempty_rows(tmp_path, monkeypatch, caplog, script, rows, message):
    path = str(tmp_path / "sft.jsonl")
    file_io.write_jsonl(rows, path)
    trained = []
    monkeypatch.setattr(script, "C", dict(script.C))
    monkeypatch.setattr(sft, "run_sft", lambda base_model, out_dir, settings, encode, desc: trained.append(encode))
    monkeypatch.setattr(script, "encode", lambda tokenizer, rows: rows)
    with caplog.at_level(logging.WARNING, logger="file_io"):
        script.main([f"--SFT_DATA={path}"])
    assert trained[0](None) == [r for r in rows if all(r.values())]
    assert message in caplog.text
    file_io.write_jsonl(rows[:1] if script is sftqg else rows[1:], path)
    with pytest.raises(DataError, match="no usable rows"):
        script.main([f"--SFT_DATA={path}"])


@pytest.fixture
def layout(tmp_path):
    """A one-task MAIR layout: three documents (one empty), four queries (one empty)."""
    root = tmp_path / "data"
    file_io.write_jsonl([{"id": "d1", "doc": "alpha"}, {"id": "d2", "doc": ""}, {"id": "d3", "doc": "gamma"}],
                        mc.docs_path("PyDoc-Net", str(root)))
    queries = [{"qid": "1", "instruction": "Find it.", "query": "a", "labels": [{"id": "d1", "score": 1}]},
               {"qid": "2", "instruction": "Find it.", "query": " ", "labels": [{"id": "d1", "score": 1}]},
               {"qid": "3", "instruction": "Find it.", "query": "b", "labels": [{"id": "d2", "score": 1}]},
               {"qid": "4", "instruction": "Find it.", "query": "c", "labels": [{"id": "d3", "score": 1}]}]
    file_io.write_jsonl(queries, mc.queries_path("PyDoc-Net", str(root)))
    return str(root), queries


def test_built_sft_data_skips_empty_queries_and_documents(layout, caplog):
    root, _ = layout
    with caplog.at_level(logging.WARNING):
        rows = data.query_sft_rows(["PyDoc-Net"], root)
    assert [(r["query"], r["doc"]) for r in rows] == [("a", "alpha"), ("c", "gamma")]
    queries = mc.queries_path("PyDoc-Net", root)
    assert f"{queries}: 1 row(s) with an empty query skipped (line 2)" in caplog.text
    assert f"{queries}: 1 label(s) of an empty document skipped (line 3)" in caplog.text
    docids = data.docid_sft_rows(["PyDoc-Net"], root, None)
    assert [r["input"] for r in docids] == ["alpha", "gamma"] and all(r["output"] for r in docids)


# ----------------------------------------------------------------------------- task instruction

def _instruction_with(root, instructions, caplog):
    file_io.write_jsonl([{"qid": str(i), "instruction": text, "query": "q", "labels": []}
                         for i, text in enumerate(instructions)], mc.queries_path("PyDoc-Net", root))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="data"):
        return data.task_instruction(mc.docs_path("PyDoc-Net", root))


def test_task_instruction_says_which_rule_applied(layout, caplog):
    root, _ = layout
    assert _instruction_with(root, ["Find it.", "", "Find it."], caplog) == "Find it."
    assert not caplog.text
    assert _instruction_with(root, ["", "Find it.", "Find it."], caplog) == GENERIC_INSTRUCTION
    assert "the first query has no instruction (1 of 3 queries without an instruction)" in caplog.text
    assert "differ" not in caplog.text and caplog.records[0].levelno == logging.WARNING
    assert _instruction_with(root, ["Find it.", None], caplog) == GENERIC_INSTRUCTION
    assert "the last query has no instruction (1 of 2" in caplog.text
    assert _instruction_with(root, ["A.", "B."], caplog) == GENERIC_INSTRUCTION
    assert "the first and last queries' instructions differ (0 of 2" in caplog.text


def test_task_instruction_outside_the_mair_layout_is_generic_with_a_warning(tmp_path, caplog):
    path = _write(tmp_path / "corpus" / "docs.jsonl", '{"id": "1", "doc": "x"}\n')
    with caplog.at_level(logging.WARNING, logger="data"):
        assert data.task_instruction(path) == GENERIC_INSTRUCTION
    assert "not a MAIR-Docs/<task>/docs.jsonl path" in caplog.text
    assert mc.split_docs_path(mc.docs_path("T", "/r")) == ("/r", "T")
    assert mc.split_docs_path("/r/MAIR-Docs/T/other.jsonl") is None


# ----------------------------------------------------------------------------- permissions

@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)
    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def test_written_files_get_the_umask_permissions(tmp_path, umask):
    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    file_io.write_jsonl([{"a": 1}], str(tmp_path / "a.jsonl"))
    file_io.write_json({"a": 1}, str(tmp_path / "a.json"))
    file_io.write_pkl({"a": 1}, str(tmp_path / "a.pkl"))
    with file_io.atomic_open(str(tmp_path / "a.bin"), "wb") as f:
        f.write(b"x")
    assert {name: mode(tmp_path / name) for name in os.listdir(tmp_path)} == dict.fromkeys(
        ["a.jsonl", "a.json", "a.pkl", "a.bin"], 0o644)
    assert file_io.umask_mode() == 0o644 and file_io.umask_mode(directory=True) == 0o755
    umask(0o027)
    file_io.write_jsonl([{"a": 1}], str(tmp_path / "a.jsonl"))
    assert mode(tmp_path / "a.jsonl") == 0o640
    assert file_io.umask_mode(directory=True) == 0o750
    assert os.umask(0o027) == 0o027  # reading the umask left it as it was
