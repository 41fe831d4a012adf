"""megatron-core's ``jit_fuser`` compiles on first call, so importing megatron-core skips dynamo.

``megatron.core.jit`` sets ``jit_fuser = torch.compile``, and about twenty megatron-core functions
(fused bias-GeLU / SwiGLU, the L2 norm, MoE helpers) are decorated with it as their modules
load. ``torch.compile`` is lazy about compiling, but not about itself: its first use imports
``torch._dynamo`` and the inductor stack, about 2.2 s of every ``import megatron.core`` on this
project's 2-core CPU machine (4.0 s against 6.2 s). Every process that touches megatron-core pays
it: each torchrun rank, every converter, ``megashear finalize``.

:func:`install` (called by ``megashear/__init__.py``, before any megashear module can import
megatron-core) adds an import hook for exactly ``megatron.core.jit``. When that module has run,
its ``jit_fuser`` is replaced by :func:`compile_on_first_call`, which returns a wrapper that calls
``torch.compile(fn, **options)`` the first time the function itself is called and then always
calls the compiled function. The semantics are ``torch.compile``'s (compilation happened on the
first call already); only the import of dynamo moves to the first call, which megashear's CPU
path never makes. Processes that build a torch optimizer still import dynamo there (torch wraps
``Optimizer.add_param_group`` in ``torch._disable_dynamo``), so the saving is for the processes
that do not train: converters, ``megashear finalize``, tools, and runs refused at start-up.
Anything that is not a plain function (a module, a class) goes to
``torch.compile`` at once. ``megatron.core.jit.enable_jit_fuser()`` still restores the eager
``torch.compile``; megatron-core imported before megashear is left as it is.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import logging
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

TARGET = "megatron.core.jit"


def compile_on_first_call(model: Callable | None = None, **options: Any) -> Callable:
    """``torch.compile`` with the same call forms (``@f``, ``@f(mode=...)``, ``f(fn)``) whose
    compilation starts at the wrapped function's first call instead of at decoration."""
    if model is None:
        return functools.partial(compile_on_first_call, **options)
    if not inspect.isfunction(model):
        return sys.modules["torch"].compile(model, **options)
    compiled: Callable | None = None

    @functools.wraps(model)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            logger.debug("torch.compile(%s) on its first call", model.__qualname__)
            compiled = sys.modules["torch"].compile(model, **options)
        return compiled(*args, **kwargs)

    return call


class _JitLoader(importlib.abc.Loader):
    """Runs ``megatron.core.jit`` with its own loader, then defers its ``torch.compile``."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        torch = sys.modules.get("torch")
        if torch is not None and getattr(module, "jit_fuser", None) is torch.compile:
            module.jit_fuser = compile_on_first_call


class _JitFinder(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core.jit`` where the normal path finder would, with :class:`_JitLoader`."""

    def find_spec(self, name: str, path: Any, target: ModuleType | None = None) -> Any:
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _JitLoader(spec.loader)
        return spec


def install() -> bool:
    """Add the import hook once. False when megatron-core's jit module is already loaded (then
    nothing changes) or the hook is already in place."""
    if TARGET in sys.modules or any(isinstance(f, _JitFinder) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _JitFinder())
    return True
