"""megashear: targeted structured pruning and continued pre-training of LLaMA on megatron-core."""

from megashear import lazy_compile as _lazy_compile

__version__ = "0.1.0"

_lazy_compile.install()
