"""Verify candidates on the fly: measure each new spike pair's impact once, on a held-out batch.

A spike pair the monitor sees is a *candidate*. :class:`CandidateVerifier` measures its
impact (perplexity with it zeroed over perplexity without) with analysis's one measurement,
:func:`~sw_hooks.analysis.verify.measure_impacts`, and the verdict that earns
(``"super"`` from ``min_impact`` on). The batch it measures on is, in order: the calibration
batch the user gave, the first validation batch the training framework hands over, or else
the first batch the model ran on while being recorded (not held out: said in the docs).

Under several processes the first process of the group measures and broadcasts the
measured weights, so every process holds the same verdicts. A measurement that fails (a
model that gives NaN or infinite logits on the batch at that moment) leaves the candidates
unmeasured, with a warning: they are measured again at the next recording, and training
goes on.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sw_hooks.analysis.verify import VerifySettings, measure_impacts
from sw_hooks.core.results import SuperWeight

#: How the monitors measure by default: the paper's threshold on one window of the batch.
MONITOR_SETTINGS = VerifySettings(min_impact=2.0, window=512, stride=256)


def held_out_ids(batch: Any) -> torch.Tensor:
    """The token ids ``[batch, tokens]`` in a batch: a tensor, ``batch["input_ids"]``, or the
    first element of a tuple or list (``(input_ids, labels)``)."""
    if isinstance(batch, Mapping):
        batch = batch.get("input_ids")
    elif isinstance(batch, tuple | list) and batch:
        batch = batch[0]
    if (
        not isinstance(batch, torch.Tensor)
        or batch.is_floating_point()
        or batch.dim() not in (1, 2)
    ):
        raise TypeError(
            "a held-out batch must be integer token ids [batch, tokens], a dict with "
            f"'input_ids', or a tuple starting with them; got {type(batch).__name__}"
        )
    ids = batch.detach()
    return ids if ids.dim() == 2 else ids[None]


def language_model(model: nn.Module, modules: Sequence[str]) -> tuple[str, nn.Module]:
    """The outermost module with a Hugging Face ``config`` that holds every one of ``modules``,
    and its name: a ``LightningModule`` holds the language model as an attribute, and the
    measurement needs the model whose forward returns logits. ``("", model)`` if none is."""
    for name, module in model.named_modules():  # outermost first
        prefix = f"{name}." if name else ""
        if getattr(module, "config", None) is not None and all(
            m.startswith(prefix) for m in modules
        ):
            return name, module
    return "", model


class CandidateVerifier:
    """Measure candidates on one held-out batch, once each; agree across processes.

    Args:
        settings: how to measure (threshold, window); default :data:`MONITOR_SETTINGS`.
        calibration: the held-out batch (token ids, a dict with ``input_ids``, or a tuple);
            default: the first one handed to :meth:`hold_out`.
        process_group: the group whose first process measures (default: every process).
    """

    def __init__(
        self,
        settings: VerifySettings | None = None,
        calibration: Any = None,
        process_group: Any = None,
    ) -> None:
        self.settings = settings or MONITOR_SETTINGS
        self.batch: torch.Tensor | None = None
        self.batch_source = ""
        self._process_group = process_group
        self._capture: RemovableHandle | None = None
        if calibration is not None:
            self.hold_out(calibration, source="calibration")

    def hold_out(self, batch: Any, *, source: str) -> None:
        """Keep ``batch`` to measure on, unless one is kept already (the first one wins)."""
        if self.batch is None:
            self.batch, self.batch_source = held_out_ids(batch).clone(), source
            self.release()

    def capture_first_inputs(self, model: nn.Module, modules: Sequence[str]) -> None:
        """Without a batch yet, keep the ids of the next forward of ``model``'s language model."""
        if self.batch is not None or self._capture is not None:
            return
        _, network = language_model(model, modules)

        def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
                self.hold_out(ids, source="first recorded batch")

        self._capture = network.register_forward_pre_hook(keep, with_kwargs=True)

    def release(self) -> None:
        """Remove the capturing hook, if any."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def measure(self, model: nn.Module, candidates: Sequence[SuperWeight]) -> list[SuperWeight]:
        """``candidates`` each with its measured impact and verdict (unchanged without a batch).

        Every process must call it: the first one measures, the others receive its result.
        """
        if not candidates or self.batch is None or self.batch.shape[1] < 2:
            return list(candidates)  # nothing to measure on: they stay candidates
        measured = self._measure_here(model, candidates) if self._measures() else None
        return _broadcast(measured, self._process_group)

    def _measures(self) -> bool:
        if not _distributed(self._process_group):
            return True
        return torch.distributed.get_rank(self._process_group) == 0

    def _measure_here(self, model: nn.Module, candidates: Sequence[SuperWeight]) -> list:
        assert self.batch is not None
        prefix, network = language_model(model, [c.module for c in candidates])
        cut = len(prefix) + 1 if prefix else 0
        inside = [replace(c, module=c.module[cut:]) for c in candidates]
        training = network.training
        network.eval()  # no dropout in the measurement
        try:
            measurement = measure_impacts(network, inside, self.batch, self.settings)
        except (RuntimeError, ValueError) as error:
            what = ", ".join(c.label for c in candidates)
            warnings.warn(
                f"could not measure candidate(s) {what} ({error}); they stay candidates and "
                "are measured again at the next recording",
                RuntimeWarning,
                stacklevel=2,
            )
            return list(candidates)
        finally:
            network.train(training)
        return [
            replace(c, impact=float(m.impact), verdict=m.verdict)
            for c, m in zip(candidates, measurement.weights, strict=True)
        ]


def _distributed(group: Any) -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _broadcast(measured: list[SuperWeight] | None, group: Any) -> list[SuperWeight]:
    """Rank zero's measured weights on every process of ``group`` (a no-op on one process)."""
    if not _distributed(group):
        assert measured is not None
        return measured
    dist = torch.distributed
    source = dist.get_global_rank(group, 0) if group is not None else 0
    box: list[Any] = [measured]
    dist.broadcast_object_list(box, src=source, group=group)
    return box[0]
