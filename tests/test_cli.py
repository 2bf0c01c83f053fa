import os
import sys
from pathlib import Path

import pytest

from sw_hooks.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["detect", "/nonexistent/model.gguf"], "no such GGUF file"),
        (["detect", "--text", "/nonexistent.txt"], "no such text file"),
        (["detect", "--min-impact", "0.5"], "min_impact"),
        (["detect", "--json", "/nonexistent-dir/out.json"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_not_a_gguf_and_empty_text(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 definitely not gguf")
    assert main(["detect", str(fake), "--quiet"]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert main(["detect", "--text", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err


def test_directory_without_model(tmp_path, capsys):
    assert main(["detect", str(tmp_path), "--quiet"]) == 2
    assert "neither a config.json nor a .gguf" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["detect", "--json", "{locked}/out.json"],
        ["quantize", "--json", "{locked}/out.json"],
        ["report", "--out", "{locked}/report"],
    ],
)
def test_unwritable_output_folder_is_refused(argv, tmp_path, monkeypatch, capsys):
    # chmod cannot stop root (the tests may run as root): os.access answers for the folder
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw),
    )
    never_loaded = str(tmp_path / "never-loaded.gguf")
    assert main([*(a.format(locked=locked) for a in argv), never_loaded]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"folder {locked} is not writable" in err[0]
    assert list(tmp_path.iterdir()) == [locked] and list(locked.iterdir()) == []


def test_report_without_matplotlib_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    never_loaded = str(tmp_path / "never-loaded.gguf")
    assert main(["report", "--out", str(tmp_path / "report"), never_loaded]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        'sw-hooks report: error: the report draws figures with matplotlib: pip install "sw_hooks[plots]"'
    ]
    assert list(tmp_path.iterdir()) == []
