"""osgd-jax: Orthogonalized SGD and nested anytime neural networks in JAX.

Implements Wan, Hoffmann, Lu & Maire, *Orthogonalized SGD and Nested
Architectures for Anytime Neural Networks* (ICML 2020, arXiv:2008.06635).
"""

from osgd_jax import anytime
from osgd_jax import losses
from osgd_jax import weightings
from osgd_jax import zoo
from osgd_jax.aggregation import AggregationState
from osgd_jax.aggregation import StatefulWeighting
from osgd_jax.aggregation import from_weighting
from osgd_jax.aggregators import AdaLossState
from osgd_jax.aggregators import KeyState
from osgd_jax.aggregators import PCGradState
from osgd_jax.aggregators import adaptive_loss_balancing
from osgd_jax.aggregators import mgda
from osgd_jax.aggregators import pcgrad
from osgd_jax.aggregators import upgrad
from osgd_jax.aggregators import weighted_sum
from osgd_jax.coordinatewise import CoordinateState
from osgd_jax.coordinatewise import ExcessMTLState
from osgd_jax.coordinatewise import excess_mtl
from osgd_jax.coordinatewise import graddrop
from osgd_jax.coordinatewise import trimmed_mean
from osgd_jax.grads import value_and_per_exit_grads
from osgd_jax.gramian_aggregators import CRMOGMState
from osgd_jax.gramian_aggregators import GradVacState
from osgd_jax.gramian_aggregators import NashMTLState
from osgd_jax.gramian_aggregators import PCDState
from osgd_jax.gramian_aggregators import SimplexState
from osgd_jax.gramian_aggregators import aligned_mtl
from osgd_jax.gramian_aggregators import cagrad
from osgd_jax.gramian_aggregators import config
from osgd_jax.gramian_aggregators import crmogm
from osgd_jax.gramian_aggregators import dualproj
from osgd_jax.gramian_aggregators import fairgrad
from osgd_jax.gramian_aggregators import gradvac
from osgd_jax.gramian_aggregators import imtl_g
from osgd_jax.gramian_aggregators import krum
from osgd_jax.gramian_aggregators import modo
from osgd_jax.gramian_aggregators import nash_mtl
from osgd_jax.gramian_aggregators import pcd
from osgd_jax.gramian_aggregators import random_weighting
from osgd_jax.gramian_aggregators import sdmgrad
from osgd_jax.losses import per_exit_cross_entropy
from osgd_jax.staged import staged_value_and_per_exit_grads
from osgd_jax.transform import OsgdState
from osgd_jax.transform import osgd
from osgd_jax.transform import SwitchToSumState
from osgd_jax.transform import osgd_sgd
from osgd_jax.transform import switch_to_sum

__version__ = "0.2.0"

__all__ = [
    "AdaLossState",
    "AggregationState",
    "CRMOGMState",
    "CoordinateState",
    "ExcessMTLState",
    "GradVacState",
    "KeyState",
    "NashMTLState",
    "OsgdState",
    "PCDState",
    "PCGradState",
    "SimplexState",
    "StatefulWeighting",
    "SwitchToSumState",
    "adaptive_loss_balancing",
    "aligned_mtl",
    "anytime",
    "cagrad",
    "config",
    "crmogm",
    "dualproj",
    "excess_mtl",
    "fairgrad",
    "from_weighting",
    "graddrop",
    "gradvac",
    "imtl_g",
    "krum",
    "losses",
    "mgda",
    "modo",
    "nash_mtl",
    "osgd",
    "osgd_sgd",
    "pcd",
    "pcgrad",
    "per_exit_cross_entropy",
    "random_weighting",
    "sdmgrad",
    "staged_value_and_per_exit_grads",
    "switch_to_sum",
    "trimmed_mean",
    "upgrad",
    "value_and_per_exit_grads",
    "weighted_sum",
    "weightings",
    "zoo",
]
