"""Build a Mistral-7B-shaped checkpoint with random bf16 weights and one planted super weight.

Mistral-7B's shape (32 layers, hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab
32000, untied LM head): 7.24 billion parameters, 14.5 GB as bf16 safetensors. The planted
weight sits at Mistral's published coordinate, ``layers.1 down_proj [2070, 7310]``.

Generation fits in memory: a two-layer model of the same widths (embeddings, LM head and
blocks 0 and 1, about 3 GB in fp32) is built and planted with the library's own
:func:`sw_hooks.testing.plant_super_weight`, then saved; blocks 2..31 are drawn one at a
time, each written to its own safetensors shard. A ``model.safetensors.index.json`` ties the
shards together, as a published sharded checkpoint does.

    python benchmarks/build_7b.py FOLDER [--shape 7b|tiny]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sw_hooks.testing import byte_tokenizer, plant_super_weight

SHAPES: dict[str, dict[str, int]] = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
}  # fmt: skip
# Mistral-7B's published super weight: layers.1.mlp.down_proj.weight[2070, 7310]. The tiny
# shape keeps the layer and takes coordinates inside its widths.
COORDINATES = {"7b": (1, 2070, 7310), "tiny": (1, 37, 101)}
# Byte-tokenizer ids ('"' and '#'): the trigger drives the super weight, which predicts the target.
TRIGGER_TOKEN, TARGET_TOKEN = 1, 2
FILLER_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# The final norm's gain is set so that the planted target's logit after its trigger is 4 x
# sqrt(hidden) x gain = 25.6 (certain) while the other logits keep a standard deviation of
# 0.02 x sqrt(hidden) x gain = 0.13. With a gain of 1 at hidden 4096 they spread to 1.3 and
# the super activation, the same vector at every trigger, biases every later token through
# attention: zeroing the weight then also helps the other tokens, and its impact fell to
# x1.68 (measured) instead of the x14 the targets alone give.
TARGET_LOGIT = 25.6
PLANTED_FILE = "planted.json"
TEXT_FILE = "calibration.txt"
INDEX_FILE = "model.safetensors.index.json"


def mistral_config(shape: str, layers: int | None = None) -> Any:
    from transformers import MistralConfig

    sizes = dict(SHAPES[shape])
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    return MistralConfig(
        **sizes,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        dtype="bfloat16",
    )


def _fill(name: str, parameter: torch.Tensor, generator: torch.Generator) -> None:
    """Embeddings N(0, 1) as in trained models, norm gains 1, every other weight N(0, 0.02)."""
    if name.endswith("embed_tokens.weight"):
        parameter.normal_(0.0, 1.0, generator=generator)
    elif parameter.ndim == 1:
        parameter.fill_(1.0)
    else:
        parameter.normal_(0.0, 0.02, generator=generator)


def random_model(config: Any, generator: torch.Generator) -> nn.Module:
    """A causal LM of ``config`` built on the meta device and filled once in place (fp32)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            _fill(name, parameter, generator)
    return model.eval()


def final_norm_gain(hidden: int) -> float:
    """The final norm's gain that gives the planted target the logit :data:`TARGET_LOGIT`
    (the LM head reads the super activation's row with weight 4)."""
    return TARGET_LOGIT / (4 * hidden**0.5)


def random_block(
    template: dict[str, torch.Size], layer: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Block ``layer``'s tensors, drawn in bf16, named as in the checkpoint."""
    tensors = {}
    for suffix, shape in template.items():
        tensor = torch.empty(shape, dtype=torch.bfloat16)
        _fill(suffix, tensor, generator)
        tensors[f"model.layers.{layer}.{suffix}"] = tensor
    return tensors


def calibration_text(tokens: int, seed: int = 0) -> str:
    """``tokens`` byte tokens: trigger, target, then two random letters, repeated."""
    pair = byte_tokenizer().decode([TRIGGER_TOKEN, TARGET_TOKEN])
    generator = torch.Generator().manual_seed(seed)
    letters = torch.randint(0, len(FILLER_LETTERS), (tokens // 4, 2), generator=generator)
    return "".join(pair + FILLER_LETTERS[a] + FILLER_LETTERS[b] for a, b in letters.tolist())


def build(folder: Path, shape: str = "7b", tokens: int = 2048, seed: int = 0) -> dict[str, Any]:
    """Write the checkpoint, its tokenizer, a calibration text and ``planted.json``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    layer, row, col = COORDINATES[shape]
    layers = SHAPES[shape]["num_hidden_layers"]
    head = random_model(mistral_config(shape, layers=layer + 1), generator)
    planted = plant_super_weight(
        head, layer, row, col, trigger_token=TRIGGER_TOKEN, target_token=TARGET_TOKEN
    ).planted[0]
    with torch.no_grad():
        head.model.norm.weight.fill_(final_norm_gain(SHAPES[shape]["hidden_size"]))
    shards = (
        layers - layer
    )  # the head shard (embeddings, blocks 0..layer, norm, LM head), then one per block
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map: dict[str, str] = {}
    first = {n: p.detach().to(torch.bfloat16).contiguous() for n, p in head.state_dict().items()}
    template = {
        n.split(".", 3)[3]: t.shape for n, t in first.items() if n.startswith("model.layers.0.")
    }
    del head
    gc.collect()
    save_file(first, folder / names[0], metadata={"format": "pt"})
    weight_map |= dict.fromkeys(first, names[0])
    total = sum(t.numel() for t in first.values())
    del first
    for shard, index in enumerate(range(layer + 1, layers), start=1):
        tensors = random_block(template, index, generator)
        save_file(tensors, folder / names[shard], metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, names[shard])
        total += sum(t.numel() for t in tensors.values())
        del tensors
    (folder / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, indent=1)
    )
    mistral_config(shape).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    (folder / TEXT_FILE).write_text(calibration_text(tokens, seed), encoding="utf-8")
    facts = {
        "shape": shape,
        "config": SHAPES[shape],
        "parameters": total,
        "checkpoint_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "planted": {
            "module": planted.module,
            "layer": planted.layer,
            "row": planted.row,
            "col": planted.col,
            "value": planted.value,
        },
        "build_seconds": time.perf_counter() - start,
    }
    (folder / PLANTED_FILE).write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args(argv)
    facts = build(args.folder, args.shape, args.tokens)
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
