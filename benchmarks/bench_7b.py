"""Detection of a Mistral-7B-shaped bf16 model on this machine: streamed, disk-offloaded, in memory.

The checkpoint is :mod:`build_7b`'s (random weights, a super weight planted at Mistral's
``layers.1 [2070, 7310]``, 14.5 GB of bf16 safetensors). Each mode runs ``detect`` with
verification as its own process, started inside a cgroup v1 memory group (as root:
``/sys/fs/cgroup/memory/NAME``), whose ``memory.max_usage_in_bytes`` is the peak (page
cache included: the kernel reclaims it at the limit):

* **streamed**: ``sw-hooks detect FOLDER --stream`` in a 4 GiB group;
* **disk offload**: accelerate's big-model inference with every decoder block on
  ``"disk"`` (embeddings, norm and head in memory), in a 4 GiB group; ``sw-hooks`` has no
  option for a per-module map, so this mode runs ``load_model(device_map=...)`` and
  ``run_detection`` from Python (:func:`offload_driver`);
* **in memory**: ``sw-hooks detect FOLDER --dtype bfloat16``, in a group capped below the
  machine's memory so that it, not a neighbour, is stopped if it does not fit.

For each: wall time, CPU time, peak memory, bytes read from storage (``wait4``'s
``ru_inblock``), the forward-equivalents the run counts, and whether the planted weight was
found and verified. Prints a table and writes ``benchmarks/results/bench_7b.json``.

    python benchmarks/build_7b.py /tmp/m7b          # once, ~10 min, 14.5 GB
    python benchmarks/bench_7b.py /tmp/m7b --tokens 128 [--modes streamed,offload,memory]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from build_7b import PLANTED_FILE, TEXT_FILE

from _common import RESULTS, environment

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
GiB = 1 << 30
LIMITS = {"streamed": 4 * GiB, "offload": 4 * GiB, "memory": 20 * GiB}
PROMPT_TOKENS = 128
WINDOW = 512


@dataclass
class ModeRun:
    mode: str
    argv: list[str]
    limit_bytes: int
    returncode: int = -1
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_cgroup_bytes: int = 0
    peak_rss_bytes: int = 0
    storage_read_bytes: int = 0
    lines: list[tuple[float, str]] = field(default_factory=list)


def _cgroup(name: str, limit: int) -> Path:
    group = CGROUP_ROOT / name
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(limit))
    (group / "memory.max_usage_in_bytes").write_text("0")  # reset the peak
    return group


def _read_lines(stream: Any, start: float, lines: list[tuple[float, str]]) -> None:
    for raw in iter(stream.readline, b""):
        lines.append((time.perf_counter() - start, raw.decode(errors="replace").rstrip()))


def run_mode(mode: str, argv: list[str], stdout: Path) -> ModeRun:
    """Run ``argv`` inside its own memory cgroup; wall and CPU time, peaks, storage reads."""
    run = ModeRun(mode, argv, LIMITS[mode])
    group = _cgroup(f"sw_hooks_{mode}", run.limit_bytes)
    procs = str(group / "cgroup.procs")

    def join_group() -> None:  # runs in the child, before exec
        with open(procs, "w") as handle:
            handle.write(str(os.getpid()))

    with stdout.open("w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE, preexec_fn=join_group)
        reader = threading.Thread(target=_read_lines, args=(process.stderr, start, run.lines))
        reader.start()
        _, status, usage = os.wait4(process.pid, 0)
        run.wall_seconds = time.perf_counter() - start
        reader.join()
    process.returncode = run.returncode = os.waitstatus_to_exitcode(status)
    run.cpu_seconds = usage.ru_utime + usage.ru_stime
    run.peak_rss_bytes = usage.ru_maxrss * 1024
    run.storage_read_bytes = usage.ru_inblock * 512
    run.peak_cgroup_bytes = int((group / "memory.max_usage_in_bytes").read_text())
    return run


def forward_equivalents(mode: str, lines: list[str], tokens: int) -> float | None:
    """Forward-equivalents the run counted, in plain forwards over the ``tokens`` of text.

    Streamed: its ``streamed:`` line (block runs over blocks, in 512-token windows). In
    memory and offloaded: each record pass is one forward over the prompt, plus the last
    ``N forwards so far`` verification line (forwards over one window of the text).
    """
    text = "\n".join(lines)
    if mode == "streamed":
        found = re.search(r"streamed: .* ([\d.]+) forwards", text)
        return float(found.group(1)) * WINDOW / tokens if found else None
    passes = len(re.findall(r"\bpass \d+: ", text))
    verified = re.findall(r"verify window \d+/\d+: ([\d.]+) forwards", text)
    window = min(WINDOW, tokens)
    prompt = min(PROMPT_TOKENS, tokens)
    return passes * prompt / tokens + (float(verified[-1]) * window / tokens if verified else 0.0)


def planted_outcome(result_file: Path, planted: dict[str, Any]) -> dict[str, Any]:
    if not result_file.is_file():
        return {"found": False, "verdict": None, "impact": None}
    result = json.loads(result_file.read_text())
    match = next(
        (w for w in result["candidates"]
         if (w["module"], w["row"], w["col"]) == (planted["module"], planted["row"], planted["col"])),
        None,
    )  # fmt: skip
    return {
        "found": match is not None,
        "verdict": match["verdict"] if match else None,
        "impact": match["impact"] if match else None,
        "candidates": [
            [w["layer"], w["row"], w["col"], w["verdict"]] for w in result["candidates"]
        ],
        "baseline_perplexity": result.get("baseline_perplexity"),
    }


def offload_driver(folder: Path, tokens: int, out: Path, offload: Path) -> None:
    """Detection with every decoder block offloaded to disk by accelerate (run as a child)."""
    from sw_hooks.analysis.detect import run_detection
    from sw_hooks.models import load_model, tokenize

    def say(line: str) -> None:
        print(f"[sw-hooks] {line}", file=sys.stderr, flush=True)

    config = json.loads((folder / "config.json").read_text())
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"} | {f"model.layers.{i}": "disk"
                                       for i in range(config["num_hidden_layers"])}  # fmt: skip
    start = time.perf_counter()
    model, tokenizer = load_model(folder, device_map=device_map, offload_folder=offload)
    say(f"loaded (blocks on disk) in {time.perf_counter() - start:.1f} s")
    text = (folder / TEXT_FILE).read_text()
    calibration = tokenize(tokenizer, text, max_tokens=tokens)
    result = run_detection(
        model, calibration[:, :PROMPT_TOKENS], calibration=calibration, model_name=str(folder),
        progress=say,
    )  # fmt: skip
    out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


def commands(folder: Path, tokens: int, work: Path) -> dict[str, list[str]]:
    cli = [str(Path(sys.executable).parent / "sw-hooks"), "detect", str(folder),
           "--text", str(folder / TEXT_FILE), "--max-tokens", str(tokens)]  # fmt: skip
    return {
        "streamed": [*cli, "--stream", "--json", str(work / "streamed.json")],
        "offload": [
            sys.executable,
            __file__,
            "--offload-driver",
            str(folder),
            "--tokens",
            str(tokens),
            "--out",
            str(work / "offload.json"),
            "--offload-folder",
            str(work / "offload"),
        ],  # fmt: skip
        "memory": [*cli, "--dtype", "bfloat16", "--json", str(work / "memory.json")],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tokens", type=int, default=128, help="tokens of calibration text")
    parser.add_argument("--modes", default="streamed,offload,memory")
    parser.add_argument(
        "--parallel",
        default="",
        help="modes to run at the same time (comma-separated), before the others one by one",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_7b.json")
    parser.add_argument("--offload-driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--offload-folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.offload_driver:
        offload_driver(args.folder, args.tokens, args.out, args.offload_folder)
        return {}
    planted = json.loads((args.folder / PLANTED_FILE).read_text())
    work = Path(tempfile.mkdtemp(prefix="sw-hooks-7b-", dir="/tmp"))
    modes = args.modes.split(",")
    argvs = commands(args.folder, args.tokens, work)
    runs: dict[str, ModeRun] = {}

    def one(mode: str) -> None:
        runs[mode] = run_mode(mode, argvs[mode], work / f"{mode}.stdout")

    together = [mode for mode in args.parallel.split(",") if mode in modes]
    threads = [threading.Thread(target=one, args=(mode,)) for mode in together]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for mode in modes:
        if mode not in together:
            one(mode)
    rows = {}
    for mode in modes:
        run = runs[mode]
        lines = [line for _, line in run.lines]
        rows[mode] = {
            **{k: v for k, v in asdict(run).items() if k != "lines"},
            "forward_equivalents": forward_equivalents(mode, lines, args.tokens),
            **planted_outcome(work / f"{mode}.json", planted["planted"]),
            "progress_lines": [
                {"t_s": round(t, 1), "line": x} for t, x in run.lines if x.startswith("[sw-hooks]")
            ],  # fmt: skip
        }
    payload = {"checkpoint": planted, "tokens": args.tokens, "parallel": args.parallel,
               "load_average_after": os.getloadavg(), "modes": rows}  # fmt: skip
    print(f"{'mode':<10}{'wall s':>9}{'CPU s':>9}{'peak GiB':>10}{'limit':>7}{'read GB':>9}"
          f"{'fwd-eq':>8}  planted")  # fmt: skip
    for mode, row in rows.items():
        fe = row["forward_equivalents"]
        print(f"{mode:<10}{row['wall_seconds']:>9.0f}{row['cpu_seconds']:>9.0f}"
              f"{row['peak_cgroup_bytes'] / GiB:>10.2f}{row['limit_bytes'] / GiB:>7.0f}"
              f"{row['storage_read_bytes'] / 1e9:>9.1f}{fe if fe is None else round(fe, 2):>8}"
              f"  rc={row['returncode']} found={row['found']} {row['verdict']} x{row['impact']}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
