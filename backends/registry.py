"""The backend registry (a module of its own: the package namespace has a ``torch`` sub-package that
would shadow the ``torch`` library).

A backend is a module exposing ``NAME``, ``unavailable_reason(device) -> str | None``,
``router_logits``, ``route``, ``experts`` and ``expert_mlp`` with the contracts of
:mod:`flashfusemoe.backends.torch`, the reference (docs/fused_moe.md, "Backends").
Selection: explicit name > ``FLASHFUSEMOE_BACKEND`` > auto (the fastest one that loads for the device);
``"auto"`` names the last explicitly.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from flashfusemoe import _env

__all__ = ["available_backends", "get_backend", "preload", "resolve_name"]

_BACKENDS: dict[str, str] = {
    "torch": "flashfusemoe.backends.torch",
    "triton": "flashfusemoe.backends.triton",
}
# Auto-selection preference per device type, fastest first (the Triton interpreter is never automatic).
_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "torch")}


def available_backends() -> list[str]:
    """Registered backend names (whether or not they can run here)."""
    return list(_BACKENDS)


_LOADED: dict[str, ModuleType] = {}  # a plain dict lookup: traceable by torch.compile, unlike an import


def _load(name: str, device: torch.device) -> tuple[ModuleType | None, str | None]:
    module = _LOADED.get(name)
    if module is None:
        try:
            module = importlib.import_module(_BACKENDS[name])
        except Exception as exc:  # noqa: BLE001 - a broken dependency (Triton) must not break the others
            return None, f"cannot import: {type(exc).__name__}: {exc}"
        _LOADED[name] = module
    reason = module.unavailable_reason(device)
    return (None, reason) if reason else (module, None)


def resolve_name(name: str | None = None) -> str:
    """The backend a call will use: ``name``, else ``FLASHFUSEMOE_BACKEND``, else ``"auto"``; checked
    against the registry (nothing is imported)."""
    name = name if name is not None else (_env.backend_from_env() or "auto")
    if not isinstance(name, str):
        raise TypeError(f"backend={name!r} must be a str or None, got {type(name).__name__}")
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; available: {available_backends()} (or 'auto')")
    return name


def preload(name: str = "auto") -> None:
    """Import the backend ``name`` (every one that imports, for ``"auto"``) now, so that selection later
    needs no import (an import inside a ``torch.compile(fullgraph=True)`` region is a graph break).
    ``MoELayer`` calls it with its backend: a ``torch`` layer never imports Triton. An explicit
    backend that cannot be imported raises here; ``"auto"`` skips it."""
    for candidate in _BACKENDS if name == "auto" else (name,):
        _, reason = _load(candidate, torch.device("cpu"))
        if name != "auto" and candidate not in _LOADED:
            raise RuntimeError(f"backend={name!r} cannot be loaded: {reason}")


def get_backend(name: str | None = None, device: torch.device | str | None = None) -> ModuleType:
    """The backend module to run on ``device``.

    ``name`` (or, when None, ``FLASHFUSEMOE_BACKEND``) that cannot run raises and says why; ``"auto"``
    (or neither) picks the first backend of the preference order that runs on ``device``.
    """
    device = torch.device(device if device is not None else "cpu")
    name = resolve_name(name)
    if name != "auto":
        module, reason = _load(name, device)
        if module is None:
            raise RuntimeError(f"backend={name!r} cannot run on {device}: {reason}")
        return module
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        module, _ = _load(candidate, device)
        if module is not None:
            return module
    raise AssertionError("the torch backend always loads")
