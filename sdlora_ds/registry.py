"""The method registry: every continual-learning method is one module of `sdlora_ds/methods/`.

A method module declares `METHOD = Method(...)`: its config name, display label, model class (an
IncrementalViT subclass, model/base.py), its options (a dataclass read from the config's
`method_options`, validated like every other section) and the adapter fields only it reads.
Config validation, the model factory and the report read this registry; nothing else switches on
the method name. Discovery is a package scan on first use: dropping a module into
`sdlora_ds/methods/` is all it takes to add a method (docs/adding_a_method.md).

This module imports nothing of the package at import time (the scan imports the method modules
when first asked), so config.py can read it without an import circle: method modules import the
model, which imports the config, which imports this.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Optional

PACKAGE = "sdlora_ds.methods"


@dataclass(frozen=True)
class Method:
    name: str
    """The config's `method` value; equal to the model class's `method` attribute."""
    label: str
    """Display name in reports (e.g. 'seq. LoRA')."""
    model: type
    """The IncrementalViT subclass; the trainer and export build it as model(cfg)."""
    options: Optional[type] = None
    """Dataclass of the method's options (config `method_options`): fields with docstrings and a
    `validate(self, p)` raising ValueError with the dotted field name and the fix. None: no options
    (a non-empty `method_options` is then an error)."""
    owns_adapter_fields: tuple = ()
    """(dotted field under `adapter`, default) pairs only this method reads: a config of another method
    that sets one away from its default is refused instead of silently ignored."""
    describe: Optional[Callable[[dict], str]] = None
    """Resolved config dict -> report label, for methods whose variants are switched on by config
    (SD-LoRA-RR / -KD); None: `label`."""
    stacks_per_task: bool = False
    """True when the method keeps one low-rank direction per task in the stacked low-rank op, so
    the stack grows with the number of tasks (limits.py bounds its total rank)."""

    def label_of(self, config: dict) -> str:
        return self.describe(config) if self.describe is not None else self.label


_methods: Optional[dict] = None


def methods() -> dict:
    """name -> Method, for every module of sdlora_ds/methods/ (imported on the first call)."""
    global _methods
    if _methods is None:
        package = importlib.import_module(PACKAGE)
        found = {}
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            module = importlib.import_module(f"{PACKAGE}.{info.name}")
            spec = getattr(module, "METHOD", None)
            assert isinstance(spec, Method), f"{module.__name__} must declare METHOD = Method(...)"
            assert spec.name not in found, f"method {spec.name!r} declared twice ({module.__name__})"
            assert spec.model.method == spec.name, f"{module.__name__}: model.method {spec.model.method!r} != {spec.name!r}"
            found[spec.name] = spec
        _methods = found
    return _methods


def get(name: str) -> Method:
    """The method called `name`; ValueError naming the config field and the allowed names."""
    known = methods()
    if name not in known:
        raise ValueError(f"config field 'method': got {name!r}; allowed: {sorted(known)}")
    return known[name]
