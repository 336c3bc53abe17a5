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
        'test': ['pytest'],
        # Only for converting a user's .pth checkpoint; never needed to train or sample.
        'torch': ['torch'],
    },
)
