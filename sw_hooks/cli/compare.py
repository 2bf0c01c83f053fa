"""``sw-hooks compare ORIGINAL CANDIDATE``: did the candidate keep the original's super activations?

Records both models on the same tokens and prints, per layer, the down-projections' peaks
side by side; per super weight, its super activation in both (same channel and token) and
the ratio; and perplexity, KL and top-1 agreement. ``--fail-if-lost`` turns a lost super
activation, or a candidate whose perplexity is no longer finite, into exit status 1, so a CI
step can guard a release; it refuses to guard nothing (no super weight to follow).

The candidate must read text as the original does: a tokenizer with other ids for the same
tokens (not only another vocabulary size) is refused, since every figure here compares the
two models' outputs at the same token ids.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from sw_hooks.analysis.model_comparison import DEFAULT_LOST_FRACTION
from sw_hooks.cli._common import (
    PROMPT_TOKENS,
    CliError,
    add_run_arguments,
    check_model_arguments,
    first_line,
    load_model_for_cli,
    progress,
    read_text,
    token_ids,
    with_model,
)
from sw_hooks.cli._paths import check_output_file, write_output
from sw_hooks.cli._super_weights import (
    add_super_weights_arguments,
    detect_on,
    read_detection,
    selected,
)

LOST_EXIT = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare a changed copy of a model (quantized, fine-tuned) with the original",
        description=(
            "Record ORIGINAL and CANDIDATE on the same tokens: per layer, the down-projections' "
            "peaks side by side; per super weight, whether its super activation survived in "
            "CANDIDATE; perplexity of both, KL(original || candidate) and top-1 agreement."
        ),
    )
    parser.add_argument("original", help="the original model: Hugging Face id, folder or .gguf")
    parser.add_argument("candidate", help="the changed model, with the original's vocabulary")
    add_super_weights_arguments(parser)
    parser.add_argument(
        "--fail-if-lost",
        type=float,
        nargs="?",
        const=DEFAULT_LOST_FRACTION,
        default=None,
        metavar="FRACTION",
        help="exit 1 when a super activation drops below FRACTION of the original's "
        f"(default FRACTION: {DEFAULT_LOST_FRACTION})",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the comparison as JSON here")
    add_run_arguments(parser)
    parser.set_defaults(func=run, gguf=None)


def _check_fraction(fraction: float | None) -> None:
    if fraction is not None and not 0 < fraction <= 1:
        raise CliError(f"--fail-if-lost takes a fraction in (0, 1], got {fraction}")


def _check_models(args: argparse.Namespace) -> None:
    """Both model paths are looked at before either loads."""
    from sw_hooks.models import check_model_spec

    for spec in (args.original, args.candidate):
        try:
            check_model_spec(spec)
        except (ValueError, TypeError, OSError) as error:
            raise CliError(first_line(error)) from None


def _check_something_followed(args: argparse.Namespace, weights: list[Any], source: str) -> None:
    """``--fail-if-lost`` over no super weight would pass whatever the candidate did."""
    if args.fail_if_lost is not None and not weights:
        raise CliError(
            f"--fail-if-lost has nothing to follow: {source}; name the super weights to follow "
            "with --super-weights FILE, or leave out --fail-if-lost"
        )


def check_same_tokenizer(original: Any, candidate: Any, text: str, max_tokens: int) -> None:
    """Refuse a candidate whose tokenizer gives other ids than the original's.

    Comparing the vocabularies catches a reordered one of the same size; comparing the
    text's ids catches the same vocabulary split differently (other merges or normaliser).
    """
    ours, theirs = _vocabulary(original), _vocabulary(candidate)
    if ours is not None and theirs is not None and ours != theirs:
        raise CliError(
            f"CANDIDATE's tokenizer differs from ORIGINAL's: {_first_difference(ours, theirs)}"
        )
    expected, got = token_ids(original, text, max_tokens), token_ids(candidate, text, max_tokens)
    if expected.shape != got.shape or not bool((expected == got).all()):
        raise CliError(
            "CANDIDATE's tokenizer splits the text differently from ORIGINAL's: compare needs "
            "a candidate with the original's tokenizer"
        )


def _vocabulary(tokenizer: Any) -> dict[str, int] | None:
    get_vocab = getattr(tokenizer, "get_vocab", None)
    return dict(get_vocab()) if callable(get_vocab) else None


def _first_difference(ours: dict[str, int], theirs: dict[str, int]) -> str:
    """The first token (in the original's id order) that the candidate numbers otherwise."""
    for token, number in sorted(ours.items(), key=lambda item: item[1]):
        if theirs.get(token) != number:
            other = theirs.get(token)
            where = "is missing" if other is None else f"is id {other}"
            return (
                f"token {token!r} is id {number} in ORIGINAL but {where} in CANDIDATE "
                f"({len(ours)} and {len(theirs)} tokens); compare needs a candidate with "
                "the original's tokenizer"
            )
    extra = sorted(set(theirs) - set(ours))[0]
    return (
        f"CANDIDATE has token {extra!r} that ORIGINAL lacks ({len(ours)} and {len(theirs)} tokens)"
    )


def _perplexity_broken(comparison: Any) -> bool:
    """The candidate no longer models the text (inf or NaN) where the original did."""
    return math.isfinite(comparison.original_perplexity) and not math.isfinite(
        comparison.candidate_perplexity
    )


def _load(args: argparse.Namespace, spec: str) -> tuple[Any, Any, str]:
    return load_model_for_cli(with_model(args, spec))


def format_comparison(comparison: Any, fraction: float) -> str:
    """The comparison as fixed-width tables: layers, then super activations, then totals."""
    lines = [
        f"original: {comparison.original}; candidate: {comparison.candidate}; "
        f"{comparison.tokens} tokens ({comparison.prompt_tokens} recorded)",
        "",
        f"{'layer':>5}  {'module':<34} {'max |out| original':>18} {'candidate':>12} "
        f"{'max |in| original':>18} {'candidate':>12}",
    ]
    for pair in comparison.layers:
        a, b = pair.original, pair.candidate
        layer = a.layer if a.layer is not None else "-"
        lines.append(
            f"{layer:>5}  {a.module:<34} {a.output_max:>18.2f} {b.output_max:>12.2f} "
            f"{a.input_max:>18.2f} {b.input_max:>12.2f}"
        )
    lines += [
        "",
        f"{'super weight':<44} {'token':>5} {'original':>11} {'candidate':>11} {'ratio':>7}",
    ]
    for s in comparison.super_activations:
        w = s.super_weight
        verdict = "LOST" if s.lost(fraction) else "kept"
        lines.append(
            f"{f'{w.module}[{w.row}, {w.col}]':<44} {s.token:>5} {s.original:>11.2f} "
            f"{s.candidate:>11.2f} {s.ratio:>7.3f}  {verdict}"
        )
    if not comparison.super_activations:
        lines.append("(no super weights to follow)")
    lines += [
        "",
        f"perplexity: original {comparison.original_perplexity:.3f}, "
        f"candidate {comparison.candidate_perplexity:.3f}",
        f"mean KL(original || candidate): {comparison.kl_divergence:.5f} nats; "
        f"top-1 agreement: {comparison.top1_agreement:.4f}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from sw_hooks.analysis.model_comparison import compare_models

    _check_fraction(args.fail_if_lost)
    check_model_arguments(args)
    check_output_file(args.json, "--json")
    given = read_detection(args)
    if given is not None:
        source = f"{args.super_weights} lists no super weight"
        _check_something_followed(args, selected(given, args), source)
    text = read_text(args.text)
    _check_models(args)
    original, tokenizer, original_name = _load(args, args.original)
    candidate, candidate_tokenizer, candidate_name = _load(args, args.candidate)
    check_same_tokenizer(tokenizer, candidate_tokenizer, text, args.max_tokens)
    ids = token_ids(tokenizer, text, args.max_tokens)
    result = given or detect_on(
        original, ids, candidates=args.candidates, quiet=args.quiet, name=original_name
    )
    weights = selected(result, args)
    _check_something_followed(args, weights, "detection found no super weight on ORIGINAL")
    comparison = compare_models(
        original,
        candidate,
        ids,
        weights,
        names=(original_name, candidate_name),
        prompt_tokens=PROMPT_TOKENS,
        progress=lambda line: progress(line, quiet=args.quiet),
    )
    fraction = args.fail_if_lost if args.fail_if_lost is not None else DEFAULT_LOST_FRACTION
    print(format_comparison(comparison, fraction))
    if args.json is not None:
        write_output(args.json, json.dumps(comparison.to_dict(), indent=2) + "\n")
        progress(f"wrote {args.json}", quiet=args.quiet)
    return _verdict(comparison, args.fail_if_lost)


def _verdict(comparison: Any, fail_if_lost: float | None) -> int:
    """Say what failed on stderr; exit 1 when ``--fail-if-lost`` guards and something did.

    A lost super activation is shown in the table; it is repeated on stderr when guarding.
    A candidate whose perplexity is no longer finite is said on stderr always.
    """
    guarding = fail_if_lost is not None
    fraction = fail_if_lost if guarding else DEFAULT_LOST_FRACTION
    lost = comparison.lost(fraction)
    broken = _perplexity_broken(comparison)
    if guarding and lost:
        print(
            f"sw-hooks compare: {len(lost)} super activation(s) below {fraction:g} of the original",
            file=sys.stderr,
        )
    if broken:
        print(
            f"sw-hooks compare: the candidate's perplexity is {comparison.candidate_perplexity} "
            f"(the original's {comparison.original_perplexity:.3f}): it no longer models the text",
            file=sys.stderr,
        )
    return LOST_EXIT if guarding and (lost or broken) else 0
