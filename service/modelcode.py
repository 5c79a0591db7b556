"""A model version's own Python code (config.yaml `code:`), imported in a namespace of
that version, so two models' `layers.py` never meet and a reload runs the code anew."""

from __future__ import annotations

import importlib
import logging
import sys
import types
import uuid
from pathlib import Path
from typing import Any

from keras.src.saving import object_registration

from service.errors import ConfigError
from service.repository import ModelSource

log = logging.getLogger(__name__)

ROOT = "tapserve_model_code"


def import_model_code(source: ModelSource, allowed: bool) -> tuple[dict[str, Any], list[str]]:
    """Import the version's `code:` entries in a package of their own; return the Keras
    objects they registered and the module names to forget at unload.

    Each version gets a fresh package, so two models' `layers.py` never meet, and a
    reload of a version runs its code anew. Registrations go to Keras' global registry
    while the code imports; they are taken out again and handed to this load alone.
    """
    entries = source.config.code
    if not entries:
        return {}, []
    if not allowed:
        raise ConfigError(
            f"model {source.name!r}: config.yaml names code to run ({', '.join(entries)}); "
            "the server runs a model's own code only when started with --allow-model-code",
            category="refused: it brings code to run (--allow-model-code)")
    child = f"{source.name}_v{source.version}_{uuid.uuid4().hex[:8]}"
    package = f"{ROOT}.{child}"
    root = sys.modules.setdefault(ROOT, _namespace(ROOT, []))
    sys.modules[package] = _namespace(package, [str(source.folder)])
    setattr(root, child, sys.modules[package])
    objects, names = dict(object_registration.GLOBAL_CUSTOM_OBJECTS), dict(
        object_registration.GLOBAL_CUSTOM_NAMES)
    try:
        for entry in entries:
            module = Path(entry).name.removesuffix(".py")
            if not (source.folder / entry).exists():
                raise ConfigError(f"model {source.name!r} version {source.version}: code entry "
                                  f"{entry!r} is not in its version folder")
            try:
                importlib.import_module(f"{package}.{module}")
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(f"model {source.name!r} version {source.version}: importing "
                                  f"{entry} failed: {type(exc).__name__}: {exc}",
                                  category="importing its model code failed") from exc
        registered = {k: v for k, v in object_registration.GLOBAL_CUSTOM_OBJECTS.items()
                      if objects.get(k) is not v}
    except BaseException:
        forget_model_code(_modules_under(package))
        raise
    finally:
        for live, saved in ((object_registration.GLOBAL_CUSTOM_OBJECTS, objects),
                            (object_registration.GLOBAL_CUSTOM_NAMES, names)):
            live.clear()
            live.update(saved)
    log.info("model %s version %d: imported %s, registering %s", source.name, source.version,
             ", ".join(entries), ", ".join(registered) or "nothing")
    return registered, _modules_under(package)


def _namespace(name: str, path: list[str]) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = path
    return module


def _modules_under(package: str) -> list[str]:
    return [n for n in sys.modules if n == package or n.startswith(package + ".")]


def forget_model_code(modules: list[str]) -> None:
    """Drop a version's modules, so its code and classes can be freed."""
    for name in modules:
        sys.modules.pop(name, None)
        parent, _, child = name.rpartition(".")
        if parent in sys.modules and getattr(sys.modules[parent], child, None) is not None:
            delattr(sys.modules[parent], child)
