"""Expert compute backends: ``torch`` (reference) and the registry that picks one per call."""

from flashfusemoe.backends.registry import available_backends, get_backend, preload, resolve_name

__all__ = ["available_backends", "get_backend", "preload", "resolve_name"]
