"""Tests for extract_iv.py's output files: every place it writes is checked before the model is loaded
(an extraction's minutes are not spent on a path that cannot take its result), and a write error,
an OSError or safetensors' own SafetensorError, ends in one line naming the file, with nothing
half-written left behind. Tiny models only."""
import errno
import os
import pathlib

import pytest

import extract_iv as X
from toys import TEXT_TOK as TOK, char_model, standin_task

FAST = ["--n_clean", "4", "--n_corrupt", "4", "--shots", "2", "--quiet"]


@pytest.fixture
def toy(monkeypatch):
    """The tiny model and task in place of the embedded ones; -> the calls made to the model loader
    and to the extraction, which a bad output path must never reach."""
    calls = []
    monkeypatch.setattr(X, "load_model", lambda *a, **k: calls.append("load") or (char_model(), TOK))
    monkeypatch.setattr(X, "load_task_by_name", lambda name: standin_task(name))
    real = X.extract_iv
    monkeypatch.setattr(X, "extract_iv", lambda *a, **k: calls.append("extract") or real(*a, **k))
    return calls


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("flag", ["--out", "--report"])
def test_a_path_under_a_regular_file_fails_before_the_extraction(tmp_path, toy, capsys, flag):
    (tmp_path / "afile").write_text("not a folder")
    bad = tmp_path / "afile" / "x" / "out.json"
    args = ["--task", "opp", *FAST, flag, str(bad)] + (["--check"] if flag == "--report" else [])
    assert X.main(args) == 2
    err = one_error_line(capsys)
    assert f"{flag} {bad}" in err and "Not a directory" in err
    assert toy == []                                  # neither the model nor the extraction was started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_out_of_the_wrong_type_fails_before_the_extraction(tmp_path, toy, capsys):
    (tmp_path / "afolder").mkdir()
    assert X.main(["--task", "opp", *FAST, "--out", str(tmp_path / "afolder")]) == 2
    assert "is a folder, this needs a file path" in one_error_line(capsys)
    (tmp_path / "afile").write_text("")
    assert X.main(["--universal", "opp", "opp2", *FAST, "--out", str(tmp_path / "afile")]) == 2
    assert "is a file, this needs a folder" in one_error_line(capsys)
    assert toy == []


def full_disk(error):
    """A stand-in for safetensors' save_file that writes part of the file, then fails as a full disk."""
    def save_file(tensors, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"\0" * 100)
        raise error
    return save_file


@pytest.mark.parametrize("kind", ["SafetensorError", "OSError"])
def test_a_failed_iv_write_is_one_line_and_leaves_no_partial_file(tmp_path, toy, capsys, monkeypatch, kind):
    from safetensors import SafetensorError
    from ivft import ivfile
    error = (SafetensorError("Error while serializing: IoError(No space left on device)")
             if kind == "SafetensorError" else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    monkeypatch.setattr(ivfile, "save_file", full_disk(error))
    out = tmp_path / "ivs" / "opp.safetensors"
    assert X.main(["--task", "opp", *FAST, "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert str(out) in err and "No space left on device" in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []           # the temporary is gone, no half IV file


def test_a_failed_report_write_is_one_line_and_leaves_no_partial_file(tmp_path, toy, capsys, monkeypatch):
    def write_bytes(self, data):
        with open(self, "wb") as f:
            f.write(data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    report = tmp_path / "rep" / "check.json"
    out = tmp_path / "opp.safetensors"
    assert X.main(["--task", "opp", *FAST, "--out", str(out), "--check", "--n_check", "4"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    assert X.main(["--task", "opp", *FAST, "--out", str(out), "--check", "--n_check", "4",
                   "--report", str(report)]) == 2
    err = one_error_line(capsys)
    assert str(report) in err and "No space left on device" in err
    assert list(report.parent.iterdir()) == []
