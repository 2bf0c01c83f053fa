"""The public surface: every top-level name resolves, and no name hides a module."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types

import sw_hooks


def _modules() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.walk_packages(sw_hooks.__path__, "sw_hooks.")
        if ".__main__" not in info.name
    )


def test_every_top_level_name_resolves_to_what_its_home_module_defines():
    for name in sw_hooks.__all__:
        value = getattr(sw_hooks, name)
        home = importlib.import_module(sw_hooks._HOME_OF[name])
        assert getattr(home, name) is value, name


def test_no_top_level_name_is_also_a_module_of_the_package():
    # `sw_hooks.detect` was once the function and hid the module: after `import sw_hooks`,
    # `sw_hooks.detect.DetectionOptions` failed. Modules live one floor down now.
    top_level_modules = {name.split(".")[1] for name in _modules()}
    assert not top_level_modules & set(sw_hooks.__all__)
    for name in _modules():
        module = importlib.import_module(name)
        assert isinstance(module, types.ModuleType), name


def test_importing_the_package_loads_no_framework():
    """``import sw_hooks`` is cheap: the names load on first use."""
    code = (
        "import sys, sw_hooks; "
        "print(sorted(m for m in ('torch', 'transformers', 'lightning', 'matplotlib') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_training_entry_points_are_one_short_import_away():
    from sw_hooks.training.guard import guard
    from sw_hooks.training.hf import SuperWeightCallback
    from sw_hooks.training.lightning import (
        SuperWeightAblation,
        SuperWeightGuard,
        SuperWeightMonitor,
    )
    from sw_hooks.training.session import watch

    lightning = importlib.import_module("sw_hooks.lightning")
    hf = importlib.import_module("sw_hooks.hf")
    assert (lightning.SuperWeightMonitor, lightning.SuperWeightGuard) == (
        SuperWeightMonitor,
        SuperWeightGuard,
    )
    assert (lightning.SuperWeightAblation, lightning.watch, lightning.guard) == (
        SuperWeightAblation,
        watch,
        guard,
    )
    assert (hf.SuperWeightCallback, hf.watch, hf.guard) == (SuperWeightCallback, watch, guard)
    for module in (lightning, hf):
        assert module.__doc__ and all(module.__dict__[name].__doc__ for name in module.__all__)


def test_the_masked_comparison_does_not_share_its_name_with_the_compare_command():
    assert "compare_masked" in sw_hooks.__all__
    assert sw_hooks._HOME_OF["compare_models"] == "sw_hooks.analysis.model_comparison"
