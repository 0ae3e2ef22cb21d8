"""aftune: auditable fine-tuning and inference in JAX/Flax."""

import setuptools

setuptools.setup(
    name="aftune",
    version="0.1.0",
    packages=setuptools.find_packages(include=["aftune", "aftune.*"]),
    package_data={"aftune": ["doctor_vectors.json"]},
    python_requires=">=3.11",
    install_requires=[
        # Pinned: these decide the bits of every step (see docs/determinism.md).
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "numpy==2.4.6",
        "ml-dtypes==0.6.0",
        "orbax-checkpoint==0.12.8",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "blake3==1.0.11",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "cryptography>=42",
        "matplotlib>=3.8",
        "zstandard>=0.22",
        "jsonschema>=4.20",  # the shapes of every document a provider sends (record/schemas.py)
        "pillow==13.0.0",  # pinned: its resize decides the stored pixels, so the dataset root
        "pyarrow>=14",  # the Hugging Face parquet image layout (data/images.py)
        # The auditable server (experiments.serve) and its client (experiments.serve_client).
        "starlette>=0.40",
        "uvicorn>=0.30",
        "httpx>=0.27",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6.100"],
        # Hugging Face parity tests; torch 2.13.0 is the CPU build shipped on the dev machines.
        "hf": ["torch==2.13.0", "transformers>=4.51"],
    },
)
