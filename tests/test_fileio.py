import pytest

from ris_utils.fileio import atomic_write


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.json"
    atomic_write(p, "old")
    atomic_write(p, b"new bytes", fsync=True)
    assert p.read_bytes() == b"new bytes"
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write(p, "old")
    with pytest.raises(TypeError):
        atomic_write(p, object())  # neither str nor bytes: fails while writing
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["a.txt"]
