"""megashear: targeted structured pruning and continued pre-training of LLaMA on megatron-core."""

__version__ = "0.1.0"
