import pytest

from eemllm_models.files import MARKER, ForeignFolderError, atomic_write_dir, written_by_eemllm


def _write(files: dict[str, str]):
    def write(folder):
        for name, text in files.items():
            (folder / name).write_text(text)
    return write


def test_atomic_write_dir_replaces_a_folder_whole(tmp_path):
    target = tmp_path / "model"
    atomic_write_dir(target, _write({"a.txt": "1", "old.txt": "x"}))
    atomic_write_dir(target, _write({"a.txt": "2"}))
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "a.txt"] and (target / "a.txt").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert oct((target / "a.txt").stat().st_mode & 0o044) == oct(0o044)  # readable like a plain write


def test_atomic_write_dir_keeps_the_old_folder_when_writing_fails(tmp_path):
    target = tmp_path / "model"
    atomic_write_dir(target, _write({"a.txt": "1"}))

    def fail(folder):
        (folder / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_dir(target, fail)
    assert (target / "a.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_write_dir_carries_named_paths_from_the_old_folder(tmp_path):
    target = tmp_path / "report"
    atomic_write_dir(target, _write({"index.html": "old"}))
    (target / "models" / "pruned").mkdir(parents=True)
    (target / "models" / "pruned" / "config.json").write_text("{}")
    atomic_write_dir(target, _write({"index.html": "new"}), carry=["models/pruned", "absent"])
    assert (target / "index.html").read_text() == "new"
    assert (target / "models" / "pruned" / "config.json").read_text() == "{}"
    assert not (target / "absent").exists() and [p.name for p in tmp_path.iterdir()] == ["report"]


def test_overwrite_refuses_a_folder_eemllm_did_not_write_and_leaves_it_untouched(tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    with pytest.raises(ForeignFolderError, match="not written by eemllm.*choose another output folder") as err:
        atomic_write_dir(target, _write({"a.txt": "1"}))
    assert err.value.path == target and not written_by_eemllm(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no staging folder left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(ForeignFolderError):
        atomic_write_dir(tmp_path / "file", _write({"a.txt": "1"}))
    assert (tmp_path / "file").read_text() == "x"
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose
    atomic_write_dir(tmp_path / "empty", _write({"a.txt": "1"}))
    assert written_by_eemllm(tmp_path / "empty")


def test_overwrite_replaces_a_folder_eemllm_wrote(tmp_path):
    target = tmp_path / "results"
    atomic_write_dir(target, _write({"a.txt": "1"}))
    assert written_by_eemllm(target)
    atomic_write_dir(target, _write({"b.txt": "2"}))
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "b.txt"]


def test_json_is_written_strict_with_nan_as_null(tmp_path):
    import json
    import math

    from eemllm_models.files import atomic_write_json

    path = atomic_write_json(tmp_path / "s.json", {"f1": math.nan, "rows": [1.0, math.nan], "n": 3})
    assert json.loads(path.read_text()) == {"f1": None, "rows": [1.0, None], "n": 3}
    assert "NaN" not in path.read_text()
