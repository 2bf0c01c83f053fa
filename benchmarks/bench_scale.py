"""Scale: ``sw-hooks detect`` with verification on a Qwen2.5-1.5B-shaped model, on the CPU.

A model of Qwen2.5-1.5B's shape (1.54 billion parameters, tied embeddings, 6.2 GB in fp32)
gets random weights and one planted, causal super weight (:func:`sw_hooks.testing.plant_super_weight`,
layer 2), and is saved as safetensors with a byte-level tokenizer and a calibration text in
which the planted trigger token is followed by its target. Then ``sw-hooks detect FOLDER
--text FILE --json OUT`` runs as a separate process, as a user runs it, while this script

* timestamps every line the command writes on stderr (its progress lines);
* samples the command's resident memory from ``/proc/PID/status`` (anonymous and
  file-backed pages apart), and takes its exact peak from the kernel when it exits
  (``wait4``'s ``ru_maxrss``, what ``/usr/bin/time -v`` prints);
* splits the run into stages (startup, loading, detection passes, verification, output)
  from the progress lines, with each stage's time, peak memory and whether any of its
  lines says how long is left.

The memory budget is 1.5 times the fp32 model's bytes. Prints a table and writes
``benchmarks/results/scale.json``.

    python benchmarks/bench_scale.py [--keep] [--folder DIR]  # ~6 GB under /tmp, minutes
    python benchmarks/bench_scale.py --checkpoint-dtype bfloat16 --out /tmp/scale_bf16.json
    python benchmarks/bench_scale.py --shape tiny --out /tmp/scale.json  # seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sw_hooks.testing import PlantedWeight, byte_tokenizer, plant_super_weight

from _common import RESULTS, environment

SHAPES: dict[str, dict[str, int]] = {
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                 num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
}  # fmt: skip

# The planted weight: down_proj.weight[ROW, COL] of layer LAYER, driven by TRIGGER_TOKEN and
# predicting TARGET_TOKEN (byte-tokenizer ids: '"' and '#'). Valid in every shape above.
LAYER, ROW, COL = 2, 37, 101
TRIGGER_TOKEN, TARGET_TOKEN = 1, 2
# Filler text: lowercase letters only, so no filler byte is a token id below
# sw_hooks.testing's reserved 16.
FILLER_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# The final norm's gain: with tied embeddings of unit scale, a gain of 1 gives a random model
# logits of standard deviation sqrt(hidden) (perplexities near e^190); 0.1 keeps them in a
# trained model's range while the planted target still wins after its trigger.
FINAL_NORM_GAIN = 0.1
MEMORY_BUDGET = 1.5
PLANTED_FILE = "planted.json"
TEXT_FILE = "calibration.txt"
ESTIMATE = re.compile(r"\bleft\b|\bETA\b|<\d+:\d+")


# -- the model -------------------------------------------------------------------------------
def qwen2_config(shape: str) -> Any:
    """A ``Qwen2Config`` of the named shape, tied embeddings, 4096 positions."""
    from transformers import Qwen2Config

    return Qwen2Config(
        **SHAPES[shape],
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=0,
    )


def random_model(config: Any, seed: int = 0) -> nn.Module:
    """A Qwen2 causal LM with random weights, filled once in place.

    Built on the meta device and materialised with ``to_empty``, so every weight is written
    exactly once (no default initialisation to overwrite): linear weights N(0, 0.02),
    embeddings N(0, 1) as in trained models, norm gains 1, biases 0. The rotary embedding's
    buffers are not parameters and are rebuilt from the config.
    """
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            _fill(name, parameter, generator)
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            model.set_submodule(name, type(module)(config=config))
    return model.eval()


def _fill(name: str, parameter: torch.Tensor, generator: torch.Generator) -> None:
    if name.endswith("embed_tokens.weight"):
        parameter.normal_(0.0, 1.0, generator=generator)
    elif parameter.ndim == 1 and "norm" in name:
        parameter.fill_(1.0)
    elif name.endswith(".bias"):
        parameter.zero_()
    else:
        parameter.normal_(0.0, 0.02, generator=generator)


def plant(model: nn.Module) -> PlantedWeight:
    """Plant the causal super weight (LAYER, ROW, COL) and quiet the final norm's gain."""
    planted = plant_super_weight(
        model, LAYER, ROW, COL, trigger_token=TRIGGER_TOKEN, target_token=TARGET_TOKEN
    )
    with torch.no_grad():
        model.model.norm.weight.fill_(FINAL_NORM_GAIN)
    return planted.planted[0]


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters in fp32 (a tied weight counted once)."""
    return 4 * sum(p.numel() for p in model.parameters())


# -- tokenizer and text ----------------------------------------------------------------------
def save_byte_tokenizer(folder: Path) -> Any:
    """Save (and return) a 256-token byte-level tokenizer: any text, no download."""
    tokenizer = byte_tokenizer()
    tokenizer.save_pretrained(folder)
    return tokenizer


def calibration_text(tokenizer: Any, tokens: int, seed: int = 0) -> str:
    """Text of ``tokens`` byte tokens: trigger, target, then two random letters, repeated.

    A quarter of the next-token predictions are the target after a trigger, which the planted
    weight alone makes right: zeroing it multiplies perplexity by far more than 2.
    """
    pair = tokenizer.decode([TRIGGER_TOKEN, TARGET_TOKEN])
    generator = torch.Generator().manual_seed(seed)
    letters = torch.randint(0, len(FILLER_LETTERS), (tokens // 4, 2), generator=generator)
    return "".join(pair + FILLER_LETTERS[a] + FILLER_LETTERS[b] for a, b in letters.tolist())


@dataclass(frozen=True)
class Checkpoint:
    """A saved model folder, the planted weight and what building it cost."""

    folder: Path
    text_file: Path
    shape: str
    checkpoint_dtype: str
    parameters: int
    fp32_bytes: int
    planted: dict[str, Any]
    build_seconds: float
    save_seconds: float
    checkpoint_bytes: int


def write_checkpoint(
    folder: Path, shape: str, tokens: int, seed: int = 0, dtype: str = "float32"
) -> Checkpoint:
    """Build, plant and save the model, its tokenizer and its calibration text into ``folder``.

    ``dtype`` is the checkpoint's (``"bfloat16"`` as published Qwen2.5 checkpoints); the
    model is built in fp32 and ``sw-hooks`` loads it in fp32 either way.
    """
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = random_model(qwen2_config(shape), seed)
    planted = plant(model)
    parameters, nbytes = fp32_bytes(model) // 4, fp32_bytes(model)
    built = time.perf_counter()
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    del model
    gc.collect()  # the model's reference cycles hold 6 GB until collected
    tokenizer = save_byte_tokenizer(folder)
    (folder / TEXT_FILE).write_text(calibration_text(tokenizer, tokens, seed), encoding="utf-8")
    saved = time.perf_counter()
    facts = {
        "shape": shape,
        "checkpoint_dtype": dtype,
        "parameters": parameters,
        "fp32_bytes": nbytes,
        "planted": asdict(planted),
        "build_seconds": built - start,
        "save_seconds": saved - built,
    }
    (folder / PLANTED_FILE).write_text(json.dumps(facts, indent=2) + "\n")
    return read_checkpoint(folder)


def read_checkpoint(folder: Path) -> Checkpoint:
    """A checkpoint :func:`write_checkpoint` saved earlier (kept with ``--keep``)."""
    facts = json.loads((folder / PLANTED_FILE).read_text())
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return Checkpoint(folder=folder, text_file=folder / TEXT_FILE, checkpoint_bytes=size, **facts)


# -- running the command ---------------------------------------------------------------------
@dataclass
class MemorySample:
    seconds: float
    rss: int
    anon: int
    file: int


@dataclass
class CommandRun:
    """What one ``sw-hooks`` process did: its stderr lines, memory and exit."""

    argv: list[str]
    returncode: int = -1
    seconds: float = 0.0
    peak_rss: int = 0
    lines: list[tuple[float, str]] = field(default_factory=list)
    samples: list[MemorySample] = field(default_factory=list)
    stdout: str = ""


def sw_hooks_argv() -> list[str]:
    """The ``sw-hooks`` command installed next to this Python, else ``python -m sw_hooks.cli``."""
    script = Path(sys.executable).parent / "sw-hooks"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "sw_hooks.cli"]


def read_status(pid: int) -> MemorySample | None:
    """The process's resident memory now (bytes), or ``None`` once it has exited."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(re.findall(r"^(VmRSS|RssAnon|RssFile):\s+(\d+) kB", text, re.MULTILINE))
    if "VmRSS" not in fields:
        return None
    kib = {key: int(value) * 1024 for key, value in fields.items()}
    return MemorySample(0.0, kib["VmRSS"], kib.get("RssAnon", 0), kib.get("RssFile", 0))


def _read_lines(stream: Any, start: float, lines: list[tuple[float, str]]) -> None:
    """Timestamp every stderr line; a carriage return (a progress bar) also ends one."""
    pending = b""
    while chunk := os.read(stream.fileno(), 65536):
        now = time.perf_counter() - start
        pending += chunk
        *complete, pending = re.split(rb"[\r\n]", pending)
        lines += [(now, line.decode(errors="replace")) for line in complete if line.strip()]
    if pending.strip():
        lines.append((time.perf_counter() - start, pending.decode(errors="replace")))


def _sample_memory(
    pid: int, start: float, samples: list[MemorySample], stop: threading.Event, every: float
) -> None:
    while not stop.is_set():
        sample = read_status(pid)
        if sample is not None:
            sample.seconds = time.perf_counter() - start
            samples.append(sample)
        stop.wait(every)


def run_command(argv: list[str], stdout_file: Path, every: float = 0.1) -> CommandRun:
    """Run ``argv``, timestamping its stderr lines and sampling its memory every ``every`` s."""
    run = CommandRun(argv)
    stop = threading.Event()
    with stdout_file.open("w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE)
        reader = threading.Thread(target=_read_lines, args=(process.stderr, start, run.lines))
        sampler = threading.Thread(
            target=_sample_memory, args=(process.pid, start, run.samples, stop, every)
        )
        reader.start()
        sampler.start()
        reader.join()  # stderr closes when the process ends
        _, status, usage = os.wait4(process.pid, 0)
        run.seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
    process.returncode = run.returncode = os.waitstatus_to_exitcode(status)
    process.stderr.close()
    run.peak_rss = usage.ru_maxrss * 1024  # KiB on Linux
    run.stdout = stdout_file.read_text()
    return run


# -- stages ----------------------------------------------------------------------------------
PREFIX = "[sw-hooks] "


@dataclass
class Stage:
    name: str
    start: float
    end: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    """``(seconds since the command started, line)``."""

    @property
    def seconds(self) -> float:
        return self.end - self.start


def stages(lines: list[tuple[float, str]], total: float) -> list[Stage]:
    """Split a ``detect`` run at its progress lines into named stages.

    startup (to ``loading ...``), loading (to ``loading ...: done``), tokenizing (to
    ``detecting ...``), detection passes (to the last ``pass N:`` line), verification (to
    ``detecting: done``), output (to the exit). A stage's lines are those written after its
    start up to and including its end, so the line that ends a stage belongs to it.
    """
    own = [(t, line[len(PREFIX) :]) for t, line in lines if line.startswith(PREFIX)]
    marks = [
        ("startup", _first(own, r"^loading .* \.\.\.$")),
        ("loading", _first(own, r"^loading .*: done in")),
        ("tokenizing", _first(own, r"^detecting \.\.\.$")),
        ("detection passes", _last(own, r"^pass \d+")),
        ("verification", _first(own, r"^detecting: done in")),
        ("output", total),
    ]
    found: list[Stage] = []
    start, after = 0.0, float("-inf")
    for name, end in marks:
        if end is None:
            continue
        found.append(Stage(name, start, end, [(t, x) for t, x in lines if after < t <= end]))
        start = after = end
    return found


def _first(lines: list[tuple[float, str]], pattern: str) -> float | None:
    return next((t for t, line in lines if re.search(pattern, line)), None)


def _last(lines: list[tuple[float, str]], pattern: str) -> float | None:
    return next((t for t, line in reversed(lines) if re.search(pattern, line)), None)


def stage_report(stage: Stage, samples: list[MemorySample]) -> dict[str, Any]:
    """A stage's time, its peak sampled memory and what its lines say of the time left."""
    inside = [s for s in samples if stage.start <= s.seconds <= stage.end]
    peak = max(inside, key=lambda s: s.rss, default=None)
    estimates = [t for t, line in stage.lines if ESTIMATE.search(line)]
    return {
        "stage": stage.name,
        "start_s": stage.start,
        "seconds": stage.seconds,
        "peak_rss_bytes": peak.rss if peak else None,
        "peak_rss_anon_bytes": peak.anon if peak else None,
        "peak_rss_file_bytes": peak.file if peak else None,
        "shows_time_left": bool(estimates),
        "first_time_left_after_s": estimates[0] - stage.start if estimates else None,
        "lines": [line for _, line in stage.lines],
    }


# -- the result ------------------------------------------------------------------------------
def planted_outcome(result: dict[str, Any], planted: dict[str, Any]) -> dict[str, Any]:
    """Whether ``detect``'s JSON result holds the planted weight, and its verdict."""
    weights = result.get("candidates", [])
    match = next(
        (
            w
            for w in weights
            if (w["module"], w["row"], w["col"])
            == (planted["module"], planted["row"], planted["col"])
        ),
        None,
    )
    return {
        "found": match is not None,
        "verdict": match["verdict"] if match else None,
        "impact": match["impact"] if match else None,
        "candidates": [[w["layer"], w["row"], w["col"], w["verdict"]] for w in weights],
        "baseline_perplexity": result.get("baseline_perplexity"),
        "joint_ablation_ratio": result.get("joint_ablation_ratio"),
    }


def summary(checkpoint: Checkpoint, run: CommandRun, result: dict) -> dict[str, Any]:
    """Everything the result file holds."""
    reports = [stage_report(s, run.samples) for s in stages(run.lines, run.seconds)]
    return {
        "shape": checkpoint.shape,
        "config": SHAPES[checkpoint.shape],
        "parameters": checkpoint.parameters,
        "fp32_bytes": checkpoint.fp32_bytes,
        "checkpoint_dtype": checkpoint.checkpoint_dtype,
        "checkpoint_bytes": checkpoint.checkpoint_bytes,
        "planted": checkpoint.planted,
        "build_seconds": checkpoint.build_seconds,
        "save_seconds": checkpoint.save_seconds,
        "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(run.argv)),
        "returncode": run.returncode,
        "total_seconds": run.seconds,
        "peak_rss_bytes": run.peak_rss,
        "peak_rss_over_fp32": run.peak_rss / checkpoint.fp32_bytes,
        "memory_budget": MEMORY_BUDGET,
        "within_memory_budget": run.peak_rss <= MEMORY_BUDGET * checkpoint.fp32_bytes,
        "peak_sampled_rss_anon_bytes": max((s.anon for s in run.samples), default=None),
        **planted_outcome(result, checkpoint.planted),
        "stages": reports,
        "stages_without_time_left": [r["stage"] for r in reports if not r["shows_time_left"]],
        "progress_lines": [{"t_s": round(t, 2), "line": line} for t, line in run.lines],
        "memory_per_second": memory_per_second(run.samples),
    }


def memory_per_second(samples: list[MemorySample]) -> list[list[int]]:
    """``[second, peak RSS, its anonymous part, its file-backed part]`` for each second run."""
    peaks: dict[int, MemorySample] = {}
    for sample in samples:
        second = int(sample.seconds)
        if second not in peaks or sample.rss > peaks[second].rss:
            peaks[second] = sample
    return [[second, s.rss, s.anon, s.file] for second, s in sorted(peaks.items())]


def print_table(payload: dict[str, Any]) -> None:
    gib = 2**30
    print(
        f"{payload['parameters'] / 1e9:.3f} B parameters, fp32 {payload['fp32_bytes'] / gib:.2f} GiB, "
        f"{payload['checkpoint_dtype']} checkpoint"
    )
    print(f"{'stage':<18}{'seconds':>9}{'peak RSS GiB':>14}{'anon':>7}{'file':>7}  time left shown")
    for r in payload["stages"]:
        peak = [r[k] / gib if r[k] is not None else float("nan") for k in
                ("peak_rss_bytes", "peak_rss_anon_bytes", "peak_rss_file_bytes")]  # fmt: skip
        shown = "yes" if r["shows_time_left"] else "NO"
        print(
            f"{r['stage']:<18}{r['seconds']:>9.1f}{peak[0]:>14.2f}{peak[1]:>7.2f}{peak[2]:>7.2f}  {shown}"
        )
    print(
        f"total {payload['total_seconds']:.1f} s, peak RSS {payload['peak_rss_bytes'] / gib:.2f} GiB "
        f"= x{payload['peak_rss_over_fp32']:.2f} of fp32 (budget x{MEMORY_BUDGET}: "
        f"{'within' if payload['within_memory_budget'] else 'OVER'})"
    )
    print(
        f"planted {payload['planted']['module']} [{payload['planted']['row']}, "
        f"{payload['planted']['col']}]: found={payload['found']} verdict={payload['verdict']} "
        f"impact={payload['impact']}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of calibration text")
    parser.add_argument("--folder", type=Path, default=None,
                        help="model folder (reused if it holds a saved checkpoint)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the model folder it builds")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="sw-hooks-scale-", dir="/tmp"))
    reused = (folder / PLANTED_FILE).is_file()
    try:
        if reused:
            checkpoint = read_checkpoint(folder)
        else:
            checkpoint = write_checkpoint(
                folder, args.shape, args.tokens, args.seed, args.checkpoint_dtype
            )
        result_file = folder / "detect.json"
        command = [*sw_hooks_argv(), "detect", str(folder), "--text", str(checkpoint.text_file),
                   "--json", str(result_file)]  # fmt: skip
        own_rss = read_status(os.getpid())
        load_before = os.getloadavg()[0]
        run = run_command(command, folder / "stdout.txt")
        # Others' processes on a shared machine slow the run: their load is part of the result.
        load_average = {"cores": os.cpu_count(), "before": load_before, "after": os.getloadavg()[0]}
        result = json.loads(result_file.read_text()) if run.returncode == 0 else {}
        payload = summary(checkpoint, run, result)
        payload["stdout"] = run.stdout
        payload["benchmark_process_rss_bytes"] = own_rss.rss if own_rss else None
        payload["load_average_1min"] = load_average
    finally:
        if not (args.keep or reused):
            shutil.rmtree(folder, ignore_errors=True)
    print_table(payload)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
