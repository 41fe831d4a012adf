"""megashear: Sheared-LLaMA style targeted structured pruning on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megashear",
    version="0.1.0",
    description="Targeted structured pruning, dynamic batch loading and continued pre-training "
    "of LLaMA models on megatron-core (TP x PP x DP)",
    packages=find_packages(include=["megashear", "megashear.*"]),
    python_requires=">=3.10",
    # torch is pinned by the Makefile (a CPU build); this range admits it without pulling CUDA.
    install_requires=[
        "torch>=2.6,<2.14",
        "megatron-core==0.16.1",
        "numpy>=1.26,<3",
        "sentencepiece==0.2.*",
        "safetensors>=0.4,<1",
        "pyyaml>=6,<7",
        "psutil>=5.9",
        "tqdm>=4.66",
        "scipy>=1.11",
    ],
    extras_require={
        # GPU accelerations; apex is built from source (see README), never from PyPI.
        "gpu": ["transformer-engine[pytorch]>=2.0", "flash-attn>=2.6"],
        "hf": ["transformers>=4.45", "gguf==0.19.0", "accelerate==1.15.0"],
        "logging": ["tensorboard>=2.15", "matplotlib>=3.8"],
        # lm-eval scores exported models on the held-out task (docs/downstream_eval.md); it
        # leaves the CPU torch alone (about 30 s and 470 MB more, most of it pyarrow and pandas).
        "eval": ["lm_eval==0.4.13"],
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "transformers>=4.45",
            "gguf==0.19.0",
            "accelerate==1.15.0",
            "tensorboard>=2.15",
            "matplotlib>=3.8",
            "lm_eval==0.4.13",
        ],
    },
    entry_points={"console_scripts": ["megashear=megashear.cli:main"]},
)
