"""The command as a user runs it on a GPU: ``sw-hooks detect --device D --dtype bfloat16``.

For :mod:`gpu_check` (``--cli``): detection with verification, as a subprocess, on
SmolLM2-135M (the embedded model) and on the Mistral-7B-shaped planted checkpoint of
:mod:`build_7b` (built into ``--checkpoint`` when that folder holds none; ``--small``
builds the tiny shape), the latter in memory and block by block (``--stream``). Each run
reports its wall time, exit status, and the verdict of the weight it should find.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from build_7b import PLANTED_FILE, TEXT_FILE, build

SMOLLM2_SUPER_WEIGHT = ("model.layers.11.mlp.down_proj", 507, 1229)


def _sw_hooks() -> list[str]:
    script = Path(sys.executable).parent / "sw-hooks"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "sw_hooks.cli"]


def _detect(argv: list[str], coordinate: tuple[str, int, int], out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    done = subprocess.run([*_sw_hooks(), "detect", *argv, "--json", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - start
    found = None
    if done.returncode == 0:
        weights = json.loads(out.read_text())["candidates"]
        found = next((w for w in weights if (w["module"], w["row"], w["col"]) == coordinate), None)
    return {
        "argv": ["sw-hooks", "detect", *argv],
        "returncode": done.returncode,
        "seconds": seconds,
        "verdict": found["verdict"] if found else None,
        "impact": found["impact"] if found else None,
        "stderr_tail": done.stderr.strip().splitlines()[-3:],
    }


def cli_runs(device: str, small: bool, checkpoint: Path | None, tokens: int,
             smollm2: bool = True) -> dict[str, dict[str, Any]]:  # fmt: skip
    """``{run name: figures}`` for each command run."""
    work = Path(tempfile.mkdtemp(prefix="sw-hooks-gpu-cli-"))
    folder = checkpoint or work / "planted"
    if not (folder / PLANTED_FILE).is_file():
        build(folder, "tiny" if small else "7b", tokens=max(tokens, 64))
    planted = json.loads((folder / PLANTED_FILE).read_text())["planted"]
    coordinate = (planted["module"], planted["row"], planted["col"])
    place = ["--device", device, "--dtype", "bfloat16", "--max-tokens", str(tokens)]
    model = [str(folder), "--text", str(folder / TEXT_FILE), *place]
    runs = {
        "planted in memory": _detect(model, coordinate, work / "memory.json"),
        "planted --stream": _detect([*model, "--stream"], coordinate, work / "stream.json"),
    }
    if smollm2:
        runs["SmolLM2-135M"] = _detect(place, SMOLLM2_SUPER_WEIGHT, work / "smollm2.json")
    return runs
