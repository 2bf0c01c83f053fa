"""Quantizer configs that keep the modules holding super weights at high precision.

No quantizer keeps a single scalar: each excludes whole modules. So a detection result
becomes, per tool, the list of modules to leave alone in that tool's own format:

* llm-compressor: a recipe whose modifier ``ignore`` list names the modules;
* torchao: a ``filter_fn`` for ``quantize_(model, config, filter_fn)``, and a script;
* Hugging Face: a ``quantization_config`` with ``llm_int8_skip_modules`` (bitsandbytes)
  or ``modules_to_not_convert`` (quanto, fp8);
* GPTQModel: a ``dynamic`` dict whose ``"-:"`` keys skip the modules;
* llama.cpp: ``llama-quantize --tensor-type`` arguments on the GGUF tensor names.

Each rendered file says how many parameters it keeps at high precision to protect how
many super weights (:class:`KeptModules`): keeping a 2M-parameter down-projection for one
scalar is a price worth seeing.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from sw_hooks.core.locate import layer_index
from sw_hooks.core.results import DetectionResult, SuperWeight
from sw_hooks.export.gguf_names import gguf_tensor_name

TOOLS = ("llm-compressor", "torchao", "hf", "gptqmodel", "llama.cpp")

HF_METHODS = ("bitsandbytes_4bit", "bitsandbytes_8bit", "quanto", "fp8")

OUTPUT_HEAD = "lm_head"
"""The output head of every causal LM in transformers: quantizers skip it by default, and a
list of modules to skip replaces that default, so the lists here name it again."""


@dataclass(frozen=True)
class KeptModules:
    """The modules a quantizer must leave at high precision, and what keeping them costs.

    Attributes:
        modules: module names (transformers naming), in layer order.
        super_weights: how many super weights they hold.
        parameters: the kept modules' weight elements in all; ``None`` when no model was
            given to count them.
        architecture: the transformers ``model_type`` (``None`` without a model); the
            llama.cpp arguments need it to name GGUF tensors.
    """

    modules: tuple[str, ...]
    super_weights: int
    parameters: int | None = None
    architecture: str | None = None

    def summary(self) -> str:
        """One line: what is kept, at what cost, for how many super weights."""
        modules = _plural(len(self.modules), "module")
        if self.parameters is None:
            cost = "parameters not counted"
        else:
            cost = _plural(self.parameters, "parameter")
        return (
            f"keeps {modules} ({cost}) at high precision "
            f"to protect {_plural(self.super_weights, 'super weight')}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept_modules": list(self.modules),
            "kept_parameters": self.parameters,
            "super_weights": self.super_weights,
            "summary": self.summary(),
        }


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'s' * (count != 1)}"


def kept_modules(
    result: DetectionResult,
    model: nn.Module | None = None,
    *,
    candidates: bool = False,
) -> KeptModules:
    """The modules holding ``result``'s super weights, chosen by
    :meth:`~sw_hooks.core.results.DetectionResult.select`: the verified ones, or every
    candidate with ``candidates=True``.

    With ``model`` each module is checked to exist and its weight elements are counted.

    Example:
        >>> weight = SuperWeight("model.layers.1.mlp.down_proj", 1, 5, 17, 3.0, verdict="super")
        >>> kept_modules(DetectionResult("tiny", (weight,))).modules
        ('model.layers.1.mlp.down_proj',)
    """
    weights = _chosen(result, candidates)
    names = tuple(sorted({w.module for w in weights}, key=_layer_order))
    if model is None:
        return KeptModules(names, len(weights))
    sizes = [_weight_elements(model, name) for name in names]
    return KeptModules(names, len(weights), sum(sizes), _model_type(model))


def _chosen(result: DetectionResult, candidates: bool) -> tuple[SuperWeight, ...]:
    if not isinstance(result, DetectionResult):
        raise TypeError(f"expected a DetectionResult, got {type(result).__name__}")
    weights = result.select(candidates=candidates)
    if not weights:
        which = "candidates" if candidates else "verified super weights"
        raise ValueError(
            f"the result of {result.model!r} has no {which}: there is nothing to keep"
            + ("; keep the unverified candidates with candidates=True" * (not candidates))
        )
    return weights


def _layer_order(name: str) -> tuple[int, str]:
    layer = layer_index(name)
    return (-1 if layer is None else layer, name)


def _weight_elements(model: nn.Module, name: str) -> int:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no module {name!r} named in the result") from None
    weight = getattr(module, "weight", None)
    if weight is not None:
        return int(weight.numel())
    return sum(int(p.numel()) for p in module.parameters())


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


# -- llm-compressor --------------------------------------------------------------------------
def llm_compressor_recipe(
    kept: KeptModules, *, scheme: str = "W4A16", modifier: str = "QuantizationModifier"
) -> dict[str, Any]:
    """An llm-compressor recipe (as a dict) that quantizes every Linear but the kept modules.

    ``ignore`` entries without a ``re:`` prefix match a module name exactly, as
    compressed-tensors' matcher reads them; the output head is ignored too.
    """
    ignore = [OUTPUT_HEAD, *kept.modules]
    stage = {"targets": ["Linear"], "scheme": scheme, "ignore": ignore}
    return {"quant_stage": {"quant_modifiers": {modifier: stage}}}


def llm_compressor_yaml(kept: KeptModules, **recipe_options: Any) -> str:
    """:func:`llm_compressor_recipe` as a YAML recipe file, headed by :meth:`KeptModules.summary`."""
    import yaml

    body = yaml.safe_dump(llm_compressor_recipe(kept, **recipe_options), sort_keys=False)
    return f"# sw_hooks: {kept.summary()}\n{body}"


# -- torchao ---------------------------------------------------------------------------------
def torchao_filter_fn(kept: KeptModules) -> Callable[[nn.Module, str], bool]:
    """A ``filter_fn`` for torchao's ``quantize_``: every linear but the kept ones.

    torchao calls it with each module and its fully qualified name and quantizes where it
    returns ``True``; like torchao's default filter it picks ``nn.Linear`` modules.
    """
    skipped = frozenset(kept.modules) | {OUTPUT_HEAD}

    def quantize_this(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and fqn not in skipped

    return quantize_this


def torchao_script(kept: KeptModules, *, config: str = "Int8WeightOnlyConfig()") -> str:
    """Python lines that quantize a ``model`` with torchao, keeping the modules.

    ``config`` is any torchao config expression from ``torchao.quantization``.
    """
    config_name = config.split("(", 1)[0]
    if not config_name.isidentifier():
        raise ValueError(
            f"config must be a torchao config call such as 'Int8WeightOnlyConfig()', got {config!r}"
        )
    keep = ",\n".join(f"    {json.dumps(name)}" for name in (OUTPUT_HEAD, *kept.modules))
    return (
        f"# sw_hooks: {kept.summary()}\n"
        "import torch\n"
        f"from torchao.quantization import {config_name}, quantize_\n\n"
        f"KEEP = {{\n{keep},\n}}\n\n"
        "quantize_(\n"
        "    model,\n"
        f"    {config},\n"
        "    filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and fqn not in KEEP,\n"
        ")\n"
    )


# -- Hugging Face ----------------------------------------------------------------------------
def hf_quantization_config(kept: KeptModules, method: str = "bitsandbytes_4bit") -> dict[str, Any]:
    """A transformers ``quantization_config`` dict that skips the kept modules.

    Read it with ``AutoQuantizationConfig.from_dict`` or put it under ``quantization_config``
    in ``config.json``. A skip list replaces transformers' default skips, so the output head
    is named in it too.
    """
    skip = [OUTPUT_HEAD, *kept.modules]
    if method == "bitsandbytes_4bit":
        return {"quant_method": "bitsandbytes", "load_in_4bit": True, "llm_int8_skip_modules": skip}
    if method == "bitsandbytes_8bit":
        return {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_skip_modules": skip}
    if method == "quanto":
        return {"quant_method": "quanto", "weights": "int8", "modules_to_not_convert": skip}
    if method == "fp8":
        return {"quant_method": "fp8", "modules_to_not_convert": skip}
    raise ValueError(f"unknown Hugging Face method {method!r}; choose one of {HF_METHODS}")


# -- GPTQModel -------------------------------------------------------------------------------
def gptqmodel_dynamic(kept: KeptModules) -> dict[str, dict[str, Any]]:
    """GPTQModel's ``QuantizeConfig(dynamic=...)``: a ``"-:"`` (skip) rule per kept module.

    GPTQModel matches each key, a regex, against full module names with ``re.match``;
    these are escaped and end in ``$`` so that layer 1 never matches layer 11.
    """
    return {f"-:{re.escape(name)}$": {} for name in kept.modules}


# -- llama.cpp -------------------------------------------------------------------------------
def llama_cpp_tensor_types(
    kept: KeptModules, *, tensor_type: str = "f16", architecture: str | None = None
) -> list[str]:
    """``llama-quantize`` arguments: ``--tensor-type <regex>=<type>`` per kept module.

    llama-quantize searches each (lower-cased) regex in the tensor names; the names are
    escaped so that each matches its own tensor only.
    """
    arch = architecture or kept.architecture
    if arch is None:
        raise ValueError(
            "naming GGUF tensors needs the architecture: pass a model or architecture="
        )
    _check_ggml_type(tensor_type)
    arguments: list[str] = []
    for module in kept.modules:
        arguments += ["--tensor-type", f"{re.escape(gguf_tensor_name(module, arch))}={tensor_type}"]
    return arguments


def _check_ggml_type(tensor_type: str) -> None:
    import gguf

    names = [t.name.lower() for t in gguf.GGMLQuantizationType]
    if tensor_type.lower() not in names:
        raise ValueError(f"unknown GGML type {tensor_type!r}; e.g. f16, bf16, q8_0")


# -- files -----------------------------------------------------------------------------------
def render(kept: KeptModules, tool: str, **options: Any) -> str:
    """The file for ``tool`` (one of :data:`TOOLS`), saying what it keeps and why.

    YAML, Python and shell get a ``#`` comment; the JSON files put the tool's part under
    its own key (``quantization_config``, ``dynamic``) beside an ``sw_hooks`` record.
    """
    if tool == "llm-compressor":
        return llm_compressor_yaml(kept, **options)
    if tool == "torchao":
        return torchao_script(kept, **options)
    if tool == "hf":
        return _json({"quantization_config": hf_quantization_config(kept, **options)}, kept)
    if tool == "gptqmodel":
        return _json({"dynamic": gptqmodel_dynamic(kept)}, kept)
    if tool == "llama.cpp":
        arguments = llama_cpp_tensor_types(kept, **options)
        pairs = [shlex.join(arguments[i : i + 2]) for i in range(0, len(arguments), 2)]
        return f"# sw_hooks: {kept.summary()}\n" + " \\\n".join(pairs) + "\n"
    raise ValueError(f"unknown tool {tool!r}; choose one of {TOOLS}")


def _json(payload: dict[str, Any], kept: KeptModules) -> str:
    return json.dumps({**payload, "sw_hooks": kept.to_dict()}, indent=2) + "\n"
