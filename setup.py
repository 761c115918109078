"""unimm: pretraining unified multimodal models (Transfusion, Chameleon, Janus) in JAX/Flax."""

import setuptools

setuptools.setup(
    name="unimm",
    version="0.1.0",
    description="Pretrain unified multimodal models (Transfusion, Chameleon, Janus) with JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["unimm", "unimm.*", "configs", "configs.*"]),
    install_requires=[
        "absl-py>=2.1",
        "array-record>=0.5",
        "clu>=0.0.12",
        "flax>=0.10",
        "grain>=0.2.12",
        "importlib-resources>=5.0",  # tensorflow-datasets needs it for builders defined in packages
        "jax>=0.4.35",
        "ml-collections>=0.1.1",
        "ml-dtypes>=0.4",  # bfloat16 tensors of Hugging Face checkpoints, read from their bytes (unimm.convert)
        "msgpack>=1.0",
        "numpy>=1.26",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "pillow>=10.0",
        "pyarrow>=14.0",
        "scikit-learn>=1.3",
        "sentencepiece>=0.2",
        "tensorboardX>=2.6",
        "tensorflow-datasets>=4.9.7",
        "tokenizers>=0.19",  # Hugging Face tokenizer.json (converted models' tokenizers)
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "portpicker>=1.6", "tensorboard>=2.15",
                 "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.0", "matplotlib>=3.7",
                 "jax[tpu]",  # libtpu's compiler: --mode=compile for TPU slices, no TPU needed
                 # The reference implementations that judge unimm.convert (tests only: conversion needs no
                 # torch). <2.14 takes the CPU build where pip finds one (a local wheel of 2.13.0+cpu).
                 "torch<2.14", "transformers>=4.45", "diffusers>=0.30"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={
        "console_scripts": [
            "unimm=unimm.main:run",
            "unimm-prepare=unimm.data.prepare:run",
            "unimm-convert=unimm.convert.cli:run",
        ],
    },
)
