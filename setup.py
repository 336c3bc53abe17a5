"""srdd_jax: SRDD (scale-wise VAR as discrete diffusion) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name='srdd_jax',
    version='0.1.0',
    description='SRDD / VAR next-scale image generation as discrete diffusion, in JAX and Flax',
    packages=find_packages(include=['srdd_jax', 'srdd_jax.*']),
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.4.35',
        'flax>=0.10',
        'optax',
        'orbax-checkpoint',
        # Every file goes through etils.epath (srdd_jax/files.py); gs:// through fsspec's gcsfs, which
        # (with TensorStore, under Orbax) follows a GCS emulator's address, so the tests run the real
        # bucket code offline.
        'etils[epath]',
        'fsspec',
        'gcsfs',
        'chex',
        'ml-collections',
        'clu',
        'absl-py',
        'tensorflow-cpu',
        'tensorflow-datasets',
        'tensorboard',
        'numpy',
        'pillow',
        'scipy',
        # The 8x8 digits bundled in its wheel: a real, offline dataset for tiny tests.
        'scikit-learn',
    ],
    extras_require={
        # The tests include an ahead-of-time TPU compile (tests/test_bench.py), which needs libtpu;
        # libtpu has Linux wheels only (elsewhere that test skips itself, saying why).
        # gcp-storage-emulator: a GCS server in Python for the bucket tests (tests/test_bucket.py).
        'test': ['pytest', 'pytest-xdist', 'jax[tpu]; sys_platform == "linux"', 'gcp-storage-emulator'],
        # libtpu for TPU hosts and for compiling TPU programs ahead of time on any host
        # (`python -m srdd_jax.bench --aot v5p:4x4x4`). jax's own `tpu` extra pins the libtpu release
        # built for that jax version (jax 0.10.2: libtpu 0.0.42.*), so it always matches the jax that
        # install_requires resolved; a libtpu of another release fails to load. From PyPI, no extra
        # index: the wheel is ~137 MB.
        'tpu': ['jax[tpu]'],
        # Only for converting a user's .pth checkpoint; never needed to train or sample.
        'torch': ['torch'],
    },
)
