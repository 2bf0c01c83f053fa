"""Write the API reference pages (``docs/api/*.rst``) from the package's module tree."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

ROOMS = {
    "core": "Locating, recording, masks and results",
    "analysis": "Detection, verification and impact",
    "quant": "Quantization",
    "export": "Export: GGUF, quantizer configs, manifest, importance matrix",
    "training": "Training: monitors, guards and callbacks",
    "outputs": "Figures, report and comparison",
    "testing": "Tiny test models with planted super weights",
}


def public_modules(package_dir: Path, package: str = "sw_hooks") -> list[str]:
    """Every module of the package whose dotted name has no part starting with ``_``."""
    names = [package]
    for info in pkgutil.walk_packages([str(package_dir)], prefix=f"{package}."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else "top"


def _entry_names(module: str) -> list[tuple[str, str]]:
    """``(name, home)`` of what ``module`` re-exports, when it only re-exports (``__all__``
    naming things defined elsewhere: a short entry path such as ``sw_hooks.lightning``)."""
    loaded = importlib.import_module(module)
    names = getattr(loaded, "__all__", None)
    if module == "sw_hooks" or not names:
        return []
    homes = [(n, getattr(getattr(loaded, n), "__module__", module)) for n in names]
    if any(home == module for _, home in homes):
        return []
    return [(n, f"{home}.{getattr(loaded, n).__qualname__}") for n, home in homes]


def _section(module: str) -> list[str]:
    lines = [module, "-" * len(module), "", f".. automodule:: {module}"]
    entry = _entry_names(module)
    if entry:  # documented at their home; listed here under the short path
        lines += ["   :no-members:", "", "What it gives:", ""]
        lines += [f"- :py:obj:`{name} <{home}>`" for name, home in entry]
    return [*lines, ""]


def _page(title: str, modules: list[str]) -> str:
    lines = [title, "=" * len(title), ""]
    for module in modules:
        lines += _section(module)
    return "\n".join(lines)


def write_api_pages(package_dir: Path, out: Path) -> None:
    """One page per room (``core``, ``analysis``...) and one for the rest, plus an index."""
    out.mkdir(exist_ok=True)
    rooms: dict[str, list[str]] = {}
    for module in public_modules(package_dir):
        rooms.setdefault(_room(module), []).append(module)
    titles = {"top": "Top level, models, command line", **ROOMS}
    for room, modules in rooms.items():
        page = _page(titles[room], modules)
        path = out / f"{room}.rst"
        if not path.exists() or path.read_text() != page:  # untouched pages stay fresh
            path.write_text(page)
    order = [room for room in ("top", *ROOMS) if room in rooms]
    index = ["API reference", "=============", "", "Generated from the docstrings.", ""]
    index += [".. toctree::", "   :maxdepth: 2", "", *(f"   {room}" for room in order), ""]
    (out / "index.rst").write_text("\n".join(index))
