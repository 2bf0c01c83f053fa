"""One detection result through every command: ``detect --json`` once, then ``quantize``,
``export``, ``compare``, ``report`` and ``quantizer-config`` read that file.

Each command runs as the user runs it, a separate process, on the same positional model (a
tiny planted llama written as a GGUF file). Every process counts the detections it runs in
a spy file (:data:`DRIVER` wraps the candidate search before the command is imported), so
"no second detection" is a count, not a timing; and each command's own output names the
weights it used, which must be the verified super weight of the detection result, the same
everywhere (the planted decoy is a candidate that verification refutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sw_hooks.testing import planted_llama

pytestmark = pytest.mark.slow

SUPER = ("model.layers.1.mlp.down_proj", 5, 17)
DECOY = ("model.layers.3.mlp.down_proj", 9, 33)
TIMEOUT_S = 300

# Runs ``sw-hooks ARGS`` after wrapping the candidate search (every detection runs it) so
# that each call appends the command's name to the spy file.
DRIVER = """
import sys
import sw_hooks.analysis.detect as detect

search = detect.search_candidates

def counted(*args, **kwargs):
    with open(sys.argv[1], "a") as spy:
        spy.write(sys.argv[2] + "\\n")
    return search(*args, **kwargs)

detect.search_candidates = counted
from sw_hooks.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The planted model as ``model.gguf``, and a text where its trigger token recurs."""
    from tokenizers import pre_tokenizers

    from sw_hooks.testing.gguf_file import save_gguf

    folder = tmp_path_factory.mktemp("one-result")
    save_gguf(planted_llama().model, folder / "model.gguf")
    # The GGUF vocabulary is the sorted byte alphabet: tokens 1, 2 and 3 are these bytes.
    trigger, target, decoy = sorted(pre_tokenizers.ByteLevel.alphabet())[1:4]
    filler = "abcdefghijklmnopqrstuvwxyz"
    (folder / "text.txt").write_text("".join(f"{trigger}{target}{c}{decoy}" for c in filler * 2))
    return folder


def _run(root: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "SW_HOOKS_CACHE_DIR": str(root / "cache"),
    }
    command = [sys.executable, "-c", DRIVER, str(root / "spy.txt"), *argv]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _common(root: Path) -> list[str]:
    return ["--text", str(root / "text.txt"), "--max-tokens", "64"]


def _detections(root: Path) -> list[str]:
    spy = root / "spy.txt"
    return spy.read_text().split() if spy.exists() else []


def test_every_command_reads_the_one_result_without_detecting_again(root: Path) -> None:
    model, result = str(root / "model.gguf"), root / "result.json"
    _run(root, "detect", model, *_common(root), "--json", str(result), "--quiet")
    assert _detections(root) == ["detect"]
    detection = json.loads(result.read_text())
    assert detection["schema_version"] == 3
    candidates = {(w["module"], w["row"], w["col"]): w["verdict"] for w in detection["candidates"]}
    assert candidates == {SUPER: "super", DECOY: "candidate"}

    given = ["--super-weights", str(result)]
    read_line = f"super weights: read from {result}"

    quantized = root / "quantize.json"
    done = _run(
        root, "quantize", model, *_common(root), *given, "--block-size", "32",
        "--json", str(quantized),
    )  # fmt: skip
    assert read_line in done.stderr
    held = [
        (w["module"], w["row"], w["col"])
        for w in json.loads(quantized.read_text())["super_weights"]
    ]
    assert held == [SUPER]

    exported, manifest = root / "export.gguf", root / "manifest.json"
    done = _run(
        root, "export", model, *_common(root), *given, "--type", "Q8_0",
        "--gguf", str(exported), "--manifest", str(manifest),
    )  # fmt: skip
    assert read_line in done.stderr
    assert "super weights: 1" in done.stdout and "kept blk.1.ffn_down.weight at" in done.stdout
    kept = json.loads(manifest.read_text())["super_weights"]
    assert [(w["module"], w["row"], w["col"]) for w in kept] == [SUPER]

    compared = root / "compare.json"
    done = _run(
        root, "compare", model, str(exported), *_common(root), *given, "--json", str(compared)
    )
    assert read_line in done.stderr
    followed = json.loads(compared.read_text())["super_activations"]
    assert [
        (s["super_weight"]["module"], s["super_weight"]["row"], s["super_weight"]["col"])
        for s in followed
    ] == [SUPER]

    out = root / "report"
    done = _run(
        root, "report", model, *_common(root), *given, "--block-size", "32", "--out", str(out)
    )
    assert read_line in done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["detection"] == detection  # the file, as read, not a new detection
    traced = [t["super_weight"] for t in report["traces"]]
    assert [(w["module"], w["row"], w["col"]) for w in traced] == [SUPER]

    done = _run(root, "quantizer-config", model, *given, "--tool", "hf", "--method", "quanto")
    assert read_line in done.stderr
    config = json.loads(done.stdout)
    assert config["sw_hooks"]["kept_modules"] == [SUPER[0]]
    assert config["sw_hooks"]["super_weights"] == 1

    assert _detections(root) == ["detect"]  # five commands, no second detection


def test_candidates_only_when_asked(root: Path) -> None:
    model, result = str(root / "model.gguf"), root / "result.json"
    if not result.exists():
        _run(root, "detect", model, *_common(root), "--json", str(result), "--quiet")
    done = _run(
        root, "quantizer-config", model, "--super-weights", str(result), "--candidates",
        "--tool", "hf", "--method", "quanto",
    )  # fmt: skip
    config = json.loads(done.stdout)
    assert config["sw_hooks"]["kept_modules"] == [SUPER[0], DECOY[0]]
    assert config["sw_hooks"]["super_weights"] == 2
