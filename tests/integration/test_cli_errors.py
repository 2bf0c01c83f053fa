"""Every ``sw-hooks`` subcommand with bad input, run as the user runs it: a separate process.

Each bad input must end with exit status 2 and exactly one line on stderr,
``sw-hooks COMMAND: error: ...`` (argparse's own errors included), no traceback, nothing on
stdout and nothing written into ``tmp_path``, where every output path of the table points.

Rows that test an argument name a model that does not exist (:data:`NEVER_LOADED`): had the
command looked the model up before checking the argument, it would have failed with
"no such GGUF file" instead of the expected message. These rows run without ``--quiet``,
so the single stderr line also shows that no "loading ..." progress line was printed. The
rows whose model loads and then fails in the library pass ``--quiet``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sw_hooks.testing import byte_tokenizer

pytestmark = pytest.mark.slow

NEVER_LOADED = "/nonexistent/sw-hooks-model-never-loaded.gguf"
SUBCOMMANDS = ("detect", "quantize", "report", "compare", "export", "quantizer-config")
TIMEOUT_S = 240

# Each command that loads a model, with a model that is never loaded.
MODEL_ARGV: list[list[str]] = [
    ["detect", "{never}"],
    ["quantize", "{never}"],
    ["report", "{never}", "--out", "{tmp}/report"],
    ["compare", "{never}", "{never}"],
    ["export", "{never}", "--gguf", "{tmp}/out.gguf"],
    ["quantizer-config", "{never}", "--super-weights", "{inputs}/missing.json", "--tool", "hf"],
]

# (argv, the text the one stderr line must contain). {tmp}: the test's tmp_path (holding only
# what _prepare_tmp puts there); {inputs}: the module's input files (the inputs fixture);
# {never}: NEVER_LOADED, the model of every row that tests an argument.
ROWS: list[tuple[list[str], str]] = [
    ([], "sw-hooks: error: the following arguments are required: COMMAND"),
    # --json / --out: a missing folder, a file as folder, a folder as file (no write permission:
    # tests/test_cli.py, which can take it away even from root)
    (
        ["detect", "{never}", "--json", "{tmp}/missing/out.json"],
        "folder {tmp}/missing does not exist",
    ),
    (
        ["quantize", "{never}", "--json", "{tmp}/missing/out.json"],
        "folder {tmp}/missing does not exist",
    ),
    (["detect", "{never}", "--json", "{tmp}/a-file/out.json"], "{tmp}/a-file is not a folder"),
    (["quantize", "{never}", "--json", "{tmp}/a-file/out.json"], "{tmp}/a-file is not a folder"),
    (["report", "{never}", "--out", "{tmp}/a-file/report"], "{tmp}/a-file is not a folder"),
    (
        ["report", "{never}", "--out", "{tmp}/a-file"],
        "--out {tmp}/a-file exists and is not a folder",
    ),
    (["detect", "{never}", "--json", "{tmp}/a-folder"], "--json {tmp}/a-folder is a folder"),
    (["quantize", "{never}", "--json", "{tmp}/a-folder"], "--json {tmp}/a-folder is a folder"),
    (
        ["report", "{never}", "--out", "{tmp}/with-folders"],
        "{tmp}/with-folders/report.md is a folder",
    ),
    # --text
    (
        ["detect", "{never}", "--text", "{inputs}/missing.txt"],
        "no such text file: {inputs}/missing.txt",
    ),
    (
        ["quantize", "{never}", "--text", "{inputs}/missing.txt"],
        "no such text file: {inputs}/missing.txt",
    ),
    (
        ["report", "{never}", "--out", "{tmp}/report", "--text", "{inputs}/missing.txt"],
        "no such text file: {inputs}/missing.txt",
    ),
    (
        ["detect", "{never}", "--text", "{inputs}"],
        "cannot read text file {inputs}: IsADirectoryError",
    ),
    (
        ["quantize", "{never}", "--text", "{inputs}/blank.txt"],
        "text file {inputs}/blank.txt is empty",
    ),
    (
        ["report", "{never}", "--out", "{tmp}/report", "--text", "{inputs}/latin1.txt"],
        "{inputs}/latin1.txt: UnicodeDecodeError",
    ),
    # --max-tokens, --gguf
    (["detect", "{never}", "--max-tokens", "1"], "--max-tokens must be at least 2, got 1"),
    (["quantize", "{never}", "--max-tokens", "1"], "--max-tokens must be at least 2, got 1"),
    (
        ["report", "{never}", "--out", "{tmp}/report", "--max-tokens", "0"],
        "--max-tokens must be at least 2, got 0",
    ),
    (
        ["quantize", "{never}", "--max-tokens", "many"],
        "argument --max-tokens: invalid int value: 'many'",
    ),
    (["detect", "--gguf", "model.gguf"], "--gguf names a file inside a MODEL folder"),
    # detect
    (["detect", "{never}", "--min-impact", "0.5"], "min_impact must be a number >= 1, got 0.5"),
    (["detect", "{never}", "--spike-factor", "nan"], "spike_factor must be a number >= 1, got nan"),
    (["detect", "{never}", "--prompt", " \n"], "--prompt is empty"),
    # quantize
    (["quantize", "{never}", "--bits", "9"], "bits must be an integer from 2 to 8, got 9"),
    (
        ["quantize", "{never}", "--block-size", "0"],
        "--block-size must be a positive integer, got 0",
    ),
    (["quantize", "{never}", "--clip", "median:3"], "unknown clip 'median:3'"),
    (["quantize", "{never}", "--holdout", "down_proj:5"], "--holdout takes MODULE:ROW:COL"),
    (["quantize", "{never}", "--super-weights", "{inputs}/missing.json"], "{inputs}/missing.json"),
    (
        ["quantize", "{never}", "--super-weights", "{inputs}/broken.json"],
        "cannot read {inputs}/broken.json",
    ),
    (
        ["quantize", "{never}", "--holdout", "m:1:2", "--super-weights", "{inputs}/broken.json"],
        "argument --super-weights: not allowed with argument --holdout",
    ),
    # report
    (
        ["report", "{never}", "--out", "{tmp}/report", "--bits", "1"],
        "bits must be an integer from 2 to 8",
    ),
    (
        ["report", "{never}", "--out", "{tmp}/report", "--block-size", "-4"],
        "--block-size must be positive",
    ),
    (["report", "{never}", "--out", "{tmp}/report", "--clip", "top"], "clip 'top' needs a number"),
    (
        ["report", "{never}", "--out", "{tmp}/report", "--history", "{inputs}/none.csv"],
        "{inputs}/none.csv",
    ),
    (
        ["report", "{never}", "--out", "{tmp}/report", "--history", "{inputs}/words.csv"],
        "cannot read --history {inputs}/words.csv",
    ),
    (["report"], "the following arguments are required: --out"),
    # --device, --dtype, --device-map, --offload-folder: every command that loads a model
    *[
        (
            [*argv, "--device", "tpu"],
            "device must be one of auto, cpu, cuda, cuda:N, mps, got 'tpu'",
        )
        for argv in MODEL_ARGV
    ],
    *[([*argv, "--device", "cuda:99"], "device cuda:99: this machine has") for argv in MODEL_ARGV],
    *[
        ([*argv, "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'")
        for argv in MODEL_ARGV
    ],
    *[
        ([*argv, "--device-map", "everywhere"], "argument --device-map: invalid choice")
        for argv in MODEL_ARGV
    ],
    *[
        (
            [*argv, "--offload-folder", "{tmp}/offload"],
            "an offload folder is used with a device map",
        )
        for argv in MODEL_ARGV
    ],
    *[
        ([*argv, "--device", "cpu", "--device-map", "auto"], "give a device (cpu) or a device map")
        for argv in MODEL_ARGV
    ],
    (
        ["detect", "{never}", "--device-map", "auto", "--offload-folder", "{tmp}/a-file"],
        "offload folder {tmp}/a-file exists and is not a folder",
    ),
    # the model itself: each is refused before any weight is read
    (["detect", "{inputs}/missing-model"], "no such model path: {inputs}/missing-model"),
    (["quantize", "{inputs}/missing.gguf"], "no such GGUF file: {inputs}/missing.gguf"),
    (["report", "--out", "{tmp}/report", "{inputs}/fake.gguf"], "is not a GGUF file"),
    (["detect", "{inputs}/empty-folder"], "neither a config.json nor a .gguf file"),
    (["detect", "{inputs}/pickle-only"], "only pickle weights (pytorch_model.bin)"),
    (["quantize", "{inputs}/pickle-only"], "only pickle weights (pytorch_model.bin)"),
    (["report", "--out", "{tmp}/report", "{inputs}/pickle-only"], "only pickle weights"),
    # errors the library raises after loading: a model without MLP down-projections
    (
        ["detect", "{inputs}/no-down-projection", "--json", "{tmp}/out.json", "--quiet"],
        "no MLP down-projection of a known architecture in MambaForCausalLM",
    ),
    (
        ["quantize", "{inputs}/no-down-projection", "--json", "{tmp}/out.json", "--quiet"],
        "no MLP down-projection of a known architecture in MambaForCausalLM",
    ),
    (
        ["report", "{inputs}/no-down-projection", "--out", "{tmp}/report", "--quiet"],
        "no MLP down-projection of a known architecture in MambaForCausalLM",
    ),
    # report --candidate: looked at before either model loads
    (
        ["report", "{never}", "--out", "{tmp}/report", "--candidate", "{inputs}/missing.gguf"],
        "--candidate: no such GGUF file: {inputs}/missing.gguf",
    ),
    (
        ["report", "{never}", "--out", "{tmp}/report", "--candidate", "{inputs}/pickle-only"],
        "--candidate: {inputs}/pickle-only holds only pickle weights",
    ),
    # compare
    (["compare", "{never}"], "the following arguments are required: candidate"),
    (
        ["compare", "{never}", "{never}", "--fail-if-lost", "1.5"],
        "--fail-if-lost takes a fraction in (0, 1], got 1.5",
    ),
    (
        ["compare", "{never}", "{never}", "--fail-if-lost", "half"],
        "argument --fail-if-lost: invalid float value: 'half'",
    ),
    (["compare", "{never}", "{never}", "--max-tokens", "1"], "--max-tokens must be at least 2"),
    (
        ["compare", "{never}", "{never}", "--json", "{tmp}/missing/out.json"],
        "folder {tmp}/missing does not exist",
    ),
    (
        ["compare", "{never}", "{never}", "--json", "{tmp}/a-folder"],
        "--json {tmp}/a-folder is a folder",
    ),
    (
        ["compare", "{never}", "{never}", "--super-weights", "{inputs}/broken.json"],
        "cannot read {inputs}/broken.json",
    ),
    (
        ["compare", "{never}", "{never}", "--text", "{inputs}/missing.txt"],
        "no such text file: {inputs}/missing.txt",
    ),
    (
        ["compare", "{inputs}/no-down-projection", "{inputs}/missing.gguf"],
        "no such GGUF file: {inputs}/missing.gguf",
    ),
    (
        ["compare", "{inputs}/no-down-projection", "{inputs}/no-down-projection", "--quiet"],
        "no MLP down-projection of a known architecture in MambaForCausalLM",
    ),
    # export
    (["export", "{never}"], "the following arguments are required: --gguf"),
    (
        ["export", "{never}", "--gguf", "{tmp}/out.gguf", "--type", "Q3_K"],
        "unknown GGUF type 'Q3_K'; choose one of Q4_0",
    ),
    (
        ["export", "{never}", "--gguf", "{tmp}/out.gguf", "--keep", "f32"],
        "--keep must be f16, q8_0 or none, got 'f32'",
    ),
    (
        ["export", "{never}", "--gguf", "{tmp}/missing/out.gguf"],
        "folder {tmp}/missing does not exist",
    ),
    (["export", "{never}", "--gguf", "{tmp}/a-folder"], "--gguf {tmp}/a-folder is a folder"),
    (
        ["export", "{never}", "--gguf", "{tmp}/out.gguf", "--manifest", "{tmp}/a-file/sw.json"],
        "{tmp}/a-file is not a folder",
    ),
    (
        [
            "export",
            "{never}",
            "--gguf",
            "{tmp}/out.gguf",
            "--super-weights",
            "{inputs}/broken.json",
        ],
        "cannot read {inputs}/broken.json",
    ),
    (
        ["export", "{never}", "--gguf", "{tmp}/out.gguf", "--max-tokens", "1"],
        "--max-tokens must be at least 2, got 1",
    ),
    (
        ["export", "{never}", "--gguf", "{tmp}/out.gguf", "--text", "{inputs}/blank.txt"],
        "text file {inputs}/blank.txt is empty",
    ),
    (["export", "{inputs}/missing.gguf", "--gguf", "{tmp}/out.gguf"], "no such GGUF file"),
    (["export", "{inputs}/fake.gguf", "--gguf", "{tmp}/out.gguf"], "is not a GGUF file"),
    (
        ["export", "{inputs}/no-down-projection", "--gguf", "{tmp}/out.gguf"],
        "reads GGUF only: convert the checkpoint with llama.cpp",
    ),
    # quantizer-config: options are refused before the result is read, the result before
    # the model loads
    (["quantizer-config"], "the following arguments are required: --tool"),
    (
        [
            "quantizer-config",
            "{never}",
            "--super-weights",
            "{inputs}/missing.json",
            "--tool",
            "awq",
        ],
        "argument --tool: invalid choice: 'awq'",
    ),
    (
        [
            "quantizer-config",
            "{never}",
            "--super-weights",
            "{inputs}/missing.json",
            "--tool",
            "llama.cpp",
            "--arch",
            "made_up",
        ],
        "gguf does not map the architecture 'made_up' to GGUF tensor names",
    ),
    (
        [
            "quantizer-config",
            "{never}",
            "--super-weights",
            "{inputs}/missing.json",
            "--tool",
            "llama.cpp",
            "--tensor-type",
            "f17",
        ],
        "unknown GGML type 'f17'",
    ),
    (
        ["quantizer-config", "{never}", "--tool", "torchao", "--torchao-config", "x+y"],
        "config must be a torchao config call such as 'Int8WeightOnlyConfig()', got 'x+y'",
    ),
    (
        ["quantizer-config", "{never}", "--tool", "hf", "--method", "gguf"],
        "argument --method: invalid choice: 'gguf'",
    ),
    (
        ["quantizer-config", "--tool", "hf", "--gguf", "model.gguf"],
        "--gguf names a file inside a MODEL folder",
    ),
    (
        ["quantizer-config", "{never}", "--tool", "hf", "-o", "{tmp}/missing/out.json"],
        "folder {tmp}/missing does not exist",
    ),
    (
        ["quantizer-config", "{never}", "--tool", "hf", "-o", "{tmp}/a-folder"],
        "-o {tmp}/a-folder is a folder",
    ),
    (
        [
            "quantizer-config",
            "{never}",
            "--super-weights",
            "{inputs}/missing.json",
            "--tool",
            "gptqmodel",
        ],
        "cannot read {inputs}/missing.json: no such file",
    ),
    (
        ["quantizer-config", "{never}", "--super-weights", "{inputs}/broken.json", "--tool", "hf"],
        "cannot read {inputs}/broken.json",
    ),
    # --super-weights: every command reads it the same way, before its model loads; a result
    # whose candidates were never verified gives no verified weights, and says so
    (
        ["report", "{never}", "--out", "{tmp}/report", "--super-weights", "{inputs}/broken.json"],
        "cannot read {inputs}/broken.json",
    ),
    (
        ["quantize", "{never}", "--super-weights", "{inputs}/unverified.json"],
        "candidate(s) that were never verified",
    ),
    (
        [
            "report",
            "{never}",
            "--out",
            "{tmp}/report",
            "--super-weights",
            "{inputs}/unverified.json",
        ],
        "candidate(s) that were never verified",
    ),
    (
        ["compare", "{never}", "{never}", "--super-weights", "{inputs}/unverified.json"],
        "candidate(s) that were never verified",
    ),
    (
        [
            "export",
            "{never}",
            "--gguf",
            "{tmp}/out.gguf",
            "--super-weights",
            "{inputs}/unverified.json",
        ],
        "candidate(s) that were never verified",
    ),
    (
        [
            "quantizer-config",
            "{never}",
            "--super-weights",
            "{inputs}/unverified.json",
            "--tool",
            "hf",
        ],
        "candidate(s) that were never verified",
    ),
    (
        ["quantize", "{never}", "--holdout", "m:1:2", "--candidates"],
        "--candidates chooses among detected weights; --holdout names them",
    ),
]


def _byte_tokenizer(directory: Path) -> None:
    byte_tokenizer().save_pretrained(directory)


def _save_without_down_projection(directory: Path) -> None:
    """A tiny Mamba (no MLP at all: neither a name nor the structure finds one), as safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "mamba", vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=8,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    _byte_tokenizer(directory)


def _save_pickle_only(directory: Path) -> None:
    """A tiny Llama as ``save_pretrained(safe_serialization=False)`` wrote it: a pickle file.

    transformers 5 always writes safetensors, so the pickle is written by ``torch.save``.
    """
    from sw_hooks.testing import tiny_model

    model = tiny_model("llama", num_layers=2)
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    _byte_tokenizer(directory)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bad input files, and two tiny model folders that load but cannot be used."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "blank.txt").write_text(" \n\t\n")
    (folder / "empty-folder").mkdir()
    (folder / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me".encode("latin-1"))
    (folder / "fake.gguf").write_bytes(b"PK\x03\x04 not a GGUF file")
    (folder / "broken.json").write_text('{"schema_version": 1, "super_weights": [')
    unverified = {"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 17, "value": 1.0}
    (folder / "unverified.json").write_text(
        json.dumps({"schema_version": 2, "model": "m", "candidates": [unverified]})
    )
    (folder / "words.csv").write_text("step,sw/value\nfirst,large\n")
    _save_without_down_projection(folder / "no-down-projection")
    _save_pickle_only(folder / "pickle-only")
    return folder


def _prepare_tmp(tmp: Path) -> None:
    """The places the output rows aim at."""
    (tmp / "a-file").write_text("a file, not a folder\n")
    (tmp / "a-folder").mkdir()
    (tmp / "with-folders" / "report.md").mkdir(parents=True)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
    }


def _expected_prefix(argv: list[str]) -> str:
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    return f"sw-hooks {command}: error: " if command else "sw-hooks: error: "


def _filled(argv: list[str], tmp: Path, inputs: Path) -> list[str]:
    return [arg.format(tmp=tmp, inputs=inputs, never=NEVER_LOADED) for arg in argv]


# Runs every row through ``sw_hooks.cli.main`` in one separate interpreter (importing the
# package once instead of once per row), each row with its own stdout and stderr; anything
# that escapes ``main`` is printed as the traceback a user would see.
DRIVER = """
import contextlib, io, json, sys, traceback
from sw_hooks.cli import main
results = []
for argv in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, sys.__stdout__)
"""

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory, inputs: Path) -> list[dict]:
    """Every row run once: its folder, the folder's tree before, and what the run gave."""
    rows = []
    for index, _ in enumerate(ROWS):
        folder = tmp_path_factory.mktemp(f"row{index}")
        _prepare_tmp(folder)
        rows.append({"tmp": folder, "before": _tree(folder)})
    argvs = [_filled(argv, row["tmp"], inputs) for (argv, _), row in zip(ROWS, rows, strict=True)]
    done = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=TIMEOUT_S * 4,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    for row, result in zip(rows, json.loads(done.stdout), strict=True):
        row.update(result, after=_tree(row["tmp"]))
    return rows


@pytest.mark.parametrize("index", range(len(ROWS)), ids=[" ".join(r[0]) or "none" for r in ROWS])
def test_bad_input_is_one_line_and_exit_2(index: int, table: list[dict], inputs: Path) -> None:
    argv, message = ROWS[index]
    row = table[index]
    tmp = row["tmp"]
    lines = row["stderr"].splitlines()
    assert (row["code"], len(lines)) == (2, 1), row["stderr"]
    assert lines[0].startswith(_expected_prefix(argv)), lines[0]
    assert message.format(tmp=tmp, inputs=inputs) in lines[0]
    assert NEVER_LOADED not in lines[0]
    assert "Traceback" not in row["stderr"] + row["stdout"]
    assert row["stdout"] == ""
    assert row["after"] == row["before"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["detect", "{never}", "--json", "{tmp}/missing/out.json"], "does not exist"),
        (["quantize", "{inputs}/no-down-projection", "--quiet"], "no MLP down-projection"),
        (["report", "{never}", "--out", "{tmp}/a-file"], "is not a folder"),
        (["detect", "{never}", "--device", "cuda:99"], "device cuda:99: this machine has"),
    ],
    ids=["detect", "quantize", "report", "detect-device"],
)
def test_the_installed_command_says_it_in_one_line(
    argv: list[str], message: str, tmp_path: Path, inputs: Path
) -> None:
    """The console script itself, one run per subcommand."""
    _prepare_tmp(tmp_path)
    before = _tree(tmp_path)
    command = [str(Path(sys.executable).parent / "sw-hooks"), *_filled(argv, tmp_path, inputs)]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S)
    lines = done.stderr.splitlines()
    assert (done.returncode, len(lines)) == (2, 1), done.stderr
    assert message in lines[0] and "Traceback" not in done.stderr
    assert _tree(tmp_path) == before
