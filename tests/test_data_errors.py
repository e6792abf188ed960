"""A corrupt row in an env's data file is a `DataError` naming the file, the line and the record,
never a KeyError / TypeError from inside a prompt builder."""
from __future__ import annotations

import json

import pytest

import simkit
from environments.ambigsql import build as ambig_build
from simkit.datafile import DataError, cached_records, data_file, read_records


def _write_records(path, records, key=None):
    """Pretty-printed (one field per line), so records start on distinct lines; returns their lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records if key is None else {"version": 1, key: records}, indent=1))
    return [line for line, _ in read_records(path, key)]


def test_read_records_lines_and_bad_json(tmp_path):
    f = tmp_path / "d.json"
    lines = _write_records(f, [{"a": 1}, {"a": [1, 2]}, {"b": "x"}])
    assert lines == [2, 5, 11]
    assert [r for _, r in read_records(f)] == [{"a": 1}, {"a": [1, 2]}, {"b": "x"}]
    f.write_text('[{"a": 1},\n {"a": 2,,}]')
    with pytest.raises(DataError, match=r"d\.json:2:10: not valid JSON"):
        read_records(f)
    f.write_bytes(b'[{"a": "\xff"}]')
    with pytest.raises(DataError, match="not UTF-8"):
        read_records(f)


def test_data_file_says_what_to_set(tmp_path):
    (tmp_path / "pacific").mkdir()
    (tmp_path / "pacific" / "validation.json").write_text("[]")
    assert data_file(tmp_path, "pacific/validation.json") == (tmp_path / "pacific" / "validation.json").resolve()
    with pytest.raises(FileNotFoundError, match=r"Abg-CoQA data not found at .*: set SIMKIT_DATA_DIR \(or data_dir=\) "
                                                r"to the folder holding abgcoqa/coqa_abg_val\.json"):
        data_file(tmp_path, "abgcoqa/coqa_abg_val.json", "Abg-CoQA data")
    with pytest.raises(FileNotFoundError, match="PACIFIC data not found"):
        simkit.make("pacific", data_dir=tmp_path / "nowhere").tasks("tune")


def test_cached_records_reads_a_file_once_per_version(tmp_path):
    f = tmp_path / "d.json"
    _write_records(f, [{"a": 1}], key="data")
    first = cached_records(f, key="data")
    assert cached_records(f, key="data") is first and [r for _, r in first] == [{"a": 1}]
    _write_records(f, [{"a": 1}, {"a": 2}], key="data")  # rewritten in place: read again
    assert [r for _, r in cached_records(f, key="data")] == [{"a": 1}, {"a": 2}]


# --------------------------------------------------------------------------- pacific
@pytest.fixture(scope="module")
def pacific_dialogues(data_dir):
    return json.loads((data_dir / "pacific" / "validation.json").read_text())[:3]


def _pacific(tmp_path, dialogues):
    lines = _write_records(tmp_path / "pacific" / "validation.json", dialogues)
    return (lambda: simkit.make("pacific", data_dir=tmp_path).tasks("tune")), lines


def test_pacific_missing_field_names_file_line_and_record(pacific_dialogues, tmp_path):
    bad = json.loads(json.dumps(pacific_dialogues))
    del bad[1]["questions"]
    load, lines = _pacific(tmp_path, bad)
    with pytest.raises(DataError) as e:
        load()
    assert str(e.value) == f"{tmp_path / 'pacific' / 'validation.json'}:{lines[1]}: record 1: missing field 'questions'"


def test_pacific_wrong_type_and_bad_json(pacific_dialogues, tmp_path):
    bad = json.loads(json.dumps(pacific_dialogues))
    bad[2]["table"]["table"] = 7
    load, lines = _pacific(tmp_path, bad)
    with pytest.raises(DataError, match=rf"validation\.json:{lines[2]}: record 2: wrong type or value"):
        load()
    (tmp_path / "bad" / "pacific").mkdir(parents=True)
    (tmp_path / "bad" / "pacific" / "validation.json").write_text('[\n{"table": }\n]')
    with pytest.raises(DataError, match=r"validation\.json:2:11: not valid JSON"):
        simkit.make("pacific", data_dir=tmp_path / "bad").tasks("tune")


# --------------------------------------------------------------------------- abgcoqa
@pytest.fixture(scope="module")
def abg_examples(data_dir):
    return json.loads((data_dir / "abgcoqa" / "coqa_abg_val.json").read_text())["data"][:3]


def test_abgcoqa_missing_field_and_wrong_type(abg_examples, tmp_path):
    bad = json.loads(json.dumps(abg_examples))
    del bad[0]["target_turn"]
    bad[2]["history_turns"] = "not a list"
    f = tmp_path / "abgcoqa" / "coqa_abg_val.json"
    lines = _write_records(f, bad, key="data")
    with pytest.raises(DataError) as e:
        simkit.make("abgcoqa", data_dir=tmp_path).tasks("tune")
    assert str(e.value) == f"{f}:{lines[0]}: record 0: missing field 'target_turn'"
    del bad[0]
    lines = _write_records(f, bad, key="data")
    (tmp_path / "b").mkdir()
    f.rename(tmp_path / "b" / "x")  # a fresh path: the loader caches by path
    (tmp_path / "c" / "abgcoqa").mkdir(parents=True)
    (tmp_path / "b" / "x").rename(tmp_path / "c" / "abgcoqa" / "coqa_abg_val.json")
    with pytest.raises(DataError, match=rf":{lines[1]}: record 1: wrong type or value"):
        simkit.make("abgcoqa", data_dir=tmp_path / "c").tasks("eval")


def test_abgcoqa_without_data_list(tmp_path):
    f = tmp_path / "abgcoqa" / "coqa_abg_val.json"
    f.parent.mkdir(parents=True)
    f.write_text('{"version": 1, "rows": []}')
    with pytest.raises(DataError, match="no 'data' list"):
        simkit.make("abgcoqa", data_dir=tmp_path).tasks("tune")


# --------------------------------------------------------------------------- ambigsql
def _ambig_example(**over):
    e = {"id": "ambigsql-test-1", "split": "test", "db_id": "db", "question": "How many singers?",
         "original_question": "How many singers?", "disambiguated_question": "How many singers?",
         "gold_action": "ANSWER", "gold_sql": "SELECT count(*) FROM singer", "clarifying_question": None,
         "clarification": None, "ambiguity": "none", "subtype": "none", "alternatives": [], "source": "spider"}
    return {**e, **over}


def _ambig_file(tmp_path, examples, schemas=None):
    doc = {"format": ambig_build.FORMAT, "stats": {"splits": ["train", "test"]},
           "schemas": schemas or {"db": "CREATE TABLE singer (name)"}, "examples": examples}
    f = tmp_path / "ambigsql.json"
    f.write_text(json.dumps(doc))
    return f


def test_ambigsql_bad_examples_are_named(tmp_path):
    ok = _ambig_example()
    f = _ambig_file(tmp_path, [ok, {k: v for k, v in ok.items() if k != "gold_sql"}])
    with pytest.raises(DataError) as e:
        simkit.make("ambigsql", path=f).tasks("test")
    assert str(e.value) == f"{f}:1: record 1: missing field 'gold_sql'"
    f = _ambig_file(tmp_path, [ok, _ambig_example(db_id="nowhere")])
    with pytest.raises(DataError, match="record 1: db_id 'nowhere' has no schema"):
        simkit.make("ambigsql", path=f).tasks("test")
    f = _ambig_file(tmp_path, [ok, _ambig_example(id=["not", "text"])])
    with pytest.raises(DataError, match="record 1: wrong type or value"):
        simkit.make("ambigsql", path=f).tasks("test")
    assert len(simkit.make("ambigsql", path=_ambig_file(tmp_path, [ok])).tasks("test")) == 1


def test_ambigsql_corrupt_file(tmp_path):
    f = tmp_path / "ambigsql.json"
    f.write_text('{"format": "x",')
    with pytest.raises(DataError, match=r"ambigsql\.json:1:16: not valid JSON"):
        simkit.make("ambigsql", path=f).tasks("test")
    f.write_text(json.dumps({"format": ambig_build.FORMAT, "schemas": {}, "stats": {}}))
    with pytest.raises(DataError, match="'examples' is missing"):
        simkit.make("ambigsql", path=f).tasks("test")


def test_toy_has_no_data_file():
    """toy is generated in code (no file to corrupt); its settings are typed like every env's."""
    assert len(simkit.make("toy", size=10).tasks("train")) == 10
    with pytest.raises(ValueError, match="max_turns"):
        simkit.make("toy", max_turn=1)
