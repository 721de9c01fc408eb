"""moejax: routing for sparse Mixture-of-Experts models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="moejax",
    version="0.1.0",
    description="Routing for sparse Mixture-of-Experts models in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["moejax", "moejax.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=[
        "jax>=0.5.0",
        "flax>=0.10.0",
        "optax>=0.2.3",
        "numpy>=1.26",
    ],
    extras_require={
        # Data pipeline and training: everything `python -m moejax.main` needs.
        "data": [
            "tensorflow-datasets>=4.9.7",
            "array-record>=0.5.1",
            "grain>=0.2.10",
            "importlib-resources",
            "ml-collections>=0.1.1",
            "absl-py>=2.1.0",
            "orbax-checkpoint>=0.9.0",
            "tensorboardX>=2.6",
            "matplotlib>=3.8",
            "tqdm>=4.66",
            "sentencepiece>=0.2",
        ],
        "notebooks": ["jupyter", "nbclient>=0.10", "ipykernel", "matplotlib>=3.8"],
        # tensorboard: tests read the event files as TensorBoard does (its purges included).
        # nbclient, nbformat, ipykernel: tests/test_notebooks.py runs colab/*.ipynb (which
        # also need matplotlib: in `data`, installed with `dev` by `make test`, and here).
        "dev": ["pytest>=8.0", "pytest-xdist>=3.6", "hypothesis>=6.100", "chex>=0.1.87",
                "tensorboard>=2.15", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29",
                "matplotlib>=3.8"],
    },
)
