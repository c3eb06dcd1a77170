"""msa_jax: Memory Sparse Attention in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="msa_jax",
    version="0.1.0",
    description="Memory Sparse Attention (MSA): a Qwen3 LM with a 100M-token routed memory, "
                "in JAX/Flax",
    packages=find_packages(include=["msa_jax", "msa_jax.*", "pallas_kernels",
                                    "pallas_kernels.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.18",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "safetensors>=0.4",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # PyTorch interop: reference models and export checks. A pinned CPU torch:
        # an unpinned one pulls a multi-GB CUDA build.
        "torch": ["torch==2.13.0", "transformers>=4.51", "tokenizers>=0.19"],
        "test": ["pytest>=8", "hypothesis>=6.100", "torch==2.13.0", "transformers>=4.51",
                 "tokenizers>=0.19"],
    },
)
