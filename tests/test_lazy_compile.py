"""megatron-core's ``jit_fuser`` compiles on first call (megashear.lazy_compile)."""

from __future__ import annotations

import subprocess
import sys

import torch

from megashear import lazy_compile


def test_importing_megatron_after_megashear_leaves_dynamo_unimported():
    code = (
        "import sys, megashear, megatron.core, megatron.core.jit as jit;"
        "from megashear.lazy_compile import compile_on_first_call;"
        "assert jit.jit_fuser is compile_on_first_call, jit.jit_fuser;"
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "False", out.stderr


def test_compiles_once_at_the_first_call_with_the_options(monkeypatch):
    calls = []

    def fake_compile(fn, **options):
        calls.append((fn, options))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    monkeypatch.setattr(torch, "compile", fake_compile)

    def add(x, y=1):
        return x + y

    bare = lazy_compile.compile_on_first_call(add)
    with_options = lazy_compile.compile_on_first_call(mode="max-autotune")(add)
    assert calls == [] and bare.__name__ == "add"
    assert bare(1, y=2) == ("compiled", 3) and bare(2) == ("compiled", 3)
    assert calls == [(add, {})]
    assert with_options(5) == ("compiled", 6)
    assert calls[1] == (add, {"mode": "max-autotune"})


def test_a_module_is_compiled_at_once(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, **o: seen.append(m) or m)
    layer = torch.nn.Linear(2, 2)
    assert lazy_compile.compile_on_first_call(layer) is layer and seen == [layer]


def test_install_is_once_and_not_after_megatron_is_loaded():
    import megatron.core.jit  # noqa: F401  (loaded by now in this process)

    assert lazy_compile.install() is False
