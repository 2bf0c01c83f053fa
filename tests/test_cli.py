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
