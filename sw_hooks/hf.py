"""Super weights in a Hugging Face ``Trainer`` and around ``model.generate``.

- :class:`SuperWeightCallback` monitors (and with ``guard=`` guards) the super weights
  while a ``Trainer`` trains: it records the down-projections every ``every_n_steps``
  optimizer steps, flags new, collapsed and drifted super weights, and appends its
  scalars to ``state.log_history``;
- :func:`watch` records around anything that runs the model (``generate`` with or without
  its KV cache, evaluation, a hand-written loop) and reports what it saw;
- :func:`guard` keeps given super weights from moving under a plain optimizer.

Each lives in its own module under :mod:`sw_hooks.training`; this is the short path to them.

Example:
    >>> from sw_hooks.hf import SuperWeightCallback, watch
    >>> callback = SuperWeightCallback(every_n_steps=10, guard="restore")
    >>> trainer = Trainer(model=model, args=args, callbacks=[callback])  # doctest: +SKIP
    >>> with watch(model) as seen:  # doctest: +SKIP
    ...     model.generate(ids, max_new_tokens=20)
    >>> seen.events  # doctest: +SKIP
"""

from sw_hooks.training.guard import guard
from sw_hooks.training.hf import SuperWeightCallback
from sw_hooks.training.session import watch

__all__ = ["SuperWeightCallback", "guard", "watch"]
