"""Reading users' training text: text files, JSONL and directories, with precise errors naming file
and line, skipping and counting bad input; a missing optional dependency is one clear line."""

import pytest

from havoc_core import HavocError
from havoc_core.sources import hf_documents, read_documents


def test_read_documents_text_jsonl_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("héllo 😀\nworld\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    assert list(read_documents([tmp_path])) == ["héllo 😀\nworld\n", "one", "two"]
    assert list(read_documents([tmp_path / "sub" / "b.jsonl"])) == ["one", "two"]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.txt", b"fine\nfine\n\xff\xfe broken", r"bad.txt:3: not UTF-8 \(byte 0xff\)"),
    ("empty.txt", b"  \n", r"empty.txt: empty file"),
    ("empty.jsonl", b"\n\n", r"empty.jsonl: empty file"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"bad.jsonl:2: not valid JSON"),
    ("keys.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"keys.jsonl:2: expected an object with a non-empty string"),
    ("list.jsonl", b'[1, 2]\n', r"list.jsonl:1: expected an object .* found list"),
    ("utf.jsonl", b'{"text": "ok"}\n{"text": "\xc3"}\n', r"utf.jsonl:2: not UTF-8"),
])
def test_bad_input_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(HavocError, match=message):
        list(read_documents([path]))


def test_skip_invalid_counts_and_keeps_the_rest(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\nnot json\n{"text": ""}\n{"text": "two"}\n')
    (tmp_path / "b.txt").write_bytes(b"\xff")
    (tmp_path / "c.txt").write_text("three")
    skipped: list[str] = []
    docs = list(read_documents([tmp_path], skip_invalid=True, skipped=skipped))
    assert docs == ["one", "two", "three"]
    assert len(skipped) == 3 and "a.jsonl:2" in skipped[0] and "a.jsonl:3" in skipped[1] and "b.txt:1" in skipped[2]


def test_skip_invalid_without_a_list_still_reports(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n[]\n')
    assert list(read_documents([tmp_path], skip_invalid=True)) == ["one"]
    assert "skipped 1 invalid inputs (first: " in capsys.readouterr().err


def test_hf_dataset_without_datasets_is_a_clear_error():
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed")
    except ImportError:
        pass
    with pytest.raises(HavocError, match="--hf-dataset needs the `datasets` package"):
        hf_documents("wikitext")


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(HavocError, match="nope.txt: no such file or directory"):
        list(read_documents([tmp_path / "nope.txt"]))
