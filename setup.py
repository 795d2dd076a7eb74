"""varcmp-jax: VarCMP video anomaly retrieval in JAX/Flax."""
import setuptools

setuptools.setup(
    name="varcmp-jax",
    version="0.1.0",
    description="VarCMP (AAAI 2025) video anomaly retrieval in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The repository's configs/ ships as varcmp_jax/configs, so `--config NAME` works in an installed wheel
    # (varcmp_jax.command_flags.bundled_configs; a source checkout or editable install reads configs/ itself).
    packages=setuptools.find_packages(include=["varcmp_jax", "varcmp_jax.*", "data_prep", "data_prep.*"])
    + ["varcmp_jax.configs"],
    package_dir={"varcmp_jax.configs": "configs"},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "array-record>=0.8",
        "ml-collections>=1.0",
        "tensorflow-datasets>=4.9.9",
        "transformers>=5.0",
        "safetensors>=0.4",
        "ftfy>=6.0",
        "av>=14",
        "numpy",
        "openpyxl>=3.1",
        "tensorboardX>=2.6",
        "tqdm",
        # The index's CRC32 of every row a query reads (varcmp_jax/index/checksum.py): ISA-L's is 9x zlib's.
        "isal>=1.6",
        "absl-py",
        "matplotlib",
        # varcmp serve: Starlette >= 1.5.1 serves Range requests (video seeking) with the DoS fixes.
        "fastapi>=0.115",
        "starlette>=1.5.1",
        "uvicorn>=0.30",
        "python-multipart>=0.0.18",
        "pillow",
    ],
    extras_require={
        # torch is needed only to export to / compare with PyTorch. The pin keeps pip on the CPU
        # build that lies on local disk; an unpinned torch pulls a multi-GB CUDA build.
        "torch": ["torch==2.13.0"],
        # `varcmp prep --runner beam` (DirectRunner here; Dataflow, Flink, Spark). 2.77.0 holds protobuf < 7,
        # pillow < 13, pyarrow < 26: pip resolves 6.33.6 / 12.x / 25.x beside the pins above.
        "beam": ["apache-beam==2.77.0"],
        "test": ["torch==2.13.0", "pytest>=8", "pytest-xdist", "selenium>=4.20"],
        # `varcmp compile --topology`: deviceless TPU compilation needs libtpu. jax's own `tpu` extra pins the libtpu
        # of the jax it belongs to; unversioned here, pip keeps the installed jax and adds its libtpu (684 MB).
        "tpu": ["jax[tpu]"],
    },
    package_data={"varcmp_jax.serve": ["static/*"]},
    entry_points={"console_scripts": ["varcmp=varcmp_jax.cli:main"]},
)
