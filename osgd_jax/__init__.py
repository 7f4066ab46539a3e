"""osgd-jax: Orthogonalized SGD and nested anytime neural networks in JAX.

Implements Wan, Hoffmann, Lu & Maire, *Orthogonalized SGD and Nested
Architectures for Anytime Neural Networks* (ICML 2020, arXiv:2008.06635).
"""

from osgd_jax.grads import value_and_per_exit_grads
from osgd_jax.transform import OsgdState
from osgd_jax.transform import osgd
from osgd_jax.transform import osgd_sgd

__version__ = "0.1.0"

__all__ = [
    "OsgdState",
    "osgd",
    "osgd_sgd",
    "value_and_per_exit_grads",
]
