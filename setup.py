from setuptools import find_packages, setup

setup(
    name="clp_fast",
    version="0.1.0",
    description="Multi-token-prediction heads + collocation-length predictor for faster LLM decoding",
    packages=find_packages(include=["clp_fast", "clp_fast.*"]),
    package_data={"clp_fast": ["assets/heads/*/*", "assets/drafters/*/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.51",
        "safetensors>=0.4",
        "gguf>=0.10",
        "accelerate>=0.30",
        "tqdm>=4.60",
        "numpy>=1.24",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest>=8", "hypothesis>=6", "triton>=3.0", "ruff"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["clp-fast=clp_fast.cli:main"]},
)
