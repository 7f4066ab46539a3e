"""Aggregators of per-exit gradients: OSGD and every Jacobian-descent method.

Every aggregator is an Optax ``GradientTransformation`` on one contract: it
takes the exits' gradients stacked on a leading axis K (every leaf
``(K, *param.shape)``, as :func:`osgd_jax.value_and_per_exit_grads`
returns them) and returns one parameter-shaped update, so it goes first in
a chain. Almost all are a *weighting* ``w = f(M)`` of the K×K Gram matrix
``M = G Gᵀ`` followed by the weighted sum ``Σ_k w_k g_k``
(:func:`from_weighting`); the weightings themselves are in
:mod:`osgd_jax.weightings`.

==================================  ==========================================
:func:`osgd`, :func:`osgd_sgd`      Orthogonalized SGD: Gram–Schmidt in
                                    priority order, then the sum (the paper)
:func:`weighted_sum`                fixed or scheduled loss weights (sum,
                                    mean, linear, geometric, SDN, constant)
:func:`adaptive_loss_balancing`     AdaLoss: ``w_k ∝ 1 / EMA(loss_k)``
:func:`pcgrad`                      PCGrad: conflicting components removed
:func:`mgda`                        MGDA: the min-norm point of the hull
:func:`upgrad`                      UPGrad: mean of dual-cone projections
:func:`dualproj`                    DualProj: the mean, projected onto the
                                    dual cone
:func:`imtl_g`                      IMTL-G: equal projections on the unit
                                    gradients
:func:`aligned_mtl`                 Aligned-MTL: the sum of aligned gradients
:func:`cagrad`                      CAGrad: the best worst case in a ball
                                    around the mean
:func:`config`                      ConFIG: equal cosines with every gradient
:func:`fairgrad`                    FairGrad: α-fair improvements of the exits
:func:`nash_mtl`                    Nash-MTL: the Nash bargaining solution
:func:`pcd`                         PCD: exit 1 first, the others guaranteed
                                    progress
:func:`gradvac`                     GradVac: cosines raised to running targets
:func:`random_weighting`            Random: softmax of Gaussian weights
:func:`krum`                        Krum: the gradient(s) nearest their
                                    neighbours
:func:`modo`                        MoDo: one projected step of MGDA's weights
:func:`sdmgrad`                     SDMGrad: MGDA's weights pulled to the mean
:func:`crmogm`                      CR-MOGM: any weighting, smoothed by an EMA
:func:`trimmed_mean`                TrimmedMean: per coordinate, without
                                    extremes
:func:`graddrop`                    GradDrop: per coordinate, one sign kept
:func:`excess_mtl`                  ExcessMTL: weights following excess risks
==================================  ==========================================

TrimmedMean, GradDrop and ExcessMTL read every coordinate of the gradients,
not only their Gram matrix. :func:`switch_to_sum` hands any of them over to
the plain sum late in training. Every aggregator also has a name in one
registry (:func:`names`, :func:`create`), which the command-line tools read.

Example:
  >>> import jax.numpy as jnp, optax, osgd_jax
  >>> tx = optax.chain(osgd_jax.aggregation.create("upgrad", num_exits=2),
  ...                  optax.sgd(0.1, momentum=0.9))
  >>> params = {"w": jnp.zeros(2)}
  >>> grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}   # (K, 2)
  >>> updates, state = tx.update(grads, tx.init(params), params)
  >>> updates["w"].shape
  (2,)
"""

from osgd_jax.aggregation._adaloss import AdaLossState, adaptive_loss_balancing
from osgd_jax.aggregation._aligned_mtl import ScaleMode, aligned_mtl
from osgd_jax.aggregation._cagrad import cagrad
from osgd_jax.aggregation._config import config
from osgd_jax.aggregation._coordinatewise import CoordinateState
from osgd_jax.aggregation._crmogm import CRMOGMState, crmogm
from osgd_jax.aggregation._dualproj import dualproj
from osgd_jax.aggregation._engine import (
  AggregationState,
  StatefulWeighting,
  from_weighting,
)
from osgd_jax.aggregation._excess_mtl import ExcessMTLState, excess_mtl
from osgd_jax.aggregation._fairgrad import fairgrad
from osgd_jax.aggregation._graddrop import graddrop
from osgd_jax.aggregation._gradvac import GradVacState, gradvac
from osgd_jax.aggregation._imtl_g import imtl_g
from osgd_jax.aggregation._krum import krum
from osgd_jax.aggregation._mgda import mgda
from osgd_jax.aggregation._modo import modo
from osgd_jax.aggregation._nash_mtl import NashMTLState, nash_mtl
from osgd_jax.aggregation._osgd import OsgdMethod, OsgdState, osgd, osgd_sgd
from osgd_jax.aggregation._pcd import PCDState, pcd
from osgd_jax.aggregation._pcgrad import PCGradState, pcgrad
from osgd_jax.aggregation._random_weighting import random_weighting
from osgd_jax.aggregation._registry import (
  create,
  names,
  options,
  weighting,
  weighting_names,
)
from osgd_jax.aggregation._sdmgrad import sdmgrad
from osgd_jax.aggregation._stateful import KeyState, SimplexState
from osgd_jax.aggregation._switch_to_sum import SwitchToSumState, switch_to_sum
from osgd_jax.aggregation._trimmed_mean import trimmed_mean
from osgd_jax.aggregation._types import Granularity, Weighting
from osgd_jax.aggregation._upgrad import upgrad
from osgd_jax.aggregation._weighted_sum import WeightPreset, weighted_sum

__all__ = [
  "AdaLossState",
  "AggregationState",
  "CRMOGMState",
  "CoordinateState",
  "ExcessMTLState",
  "GradVacState",
  "Granularity",
  "KeyState",
  "NashMTLState",
  "OsgdMethod",
  "OsgdState",
  "PCDState",
  "PCGradState",
  "ScaleMode",
  "SimplexState",
  "StatefulWeighting",
  "SwitchToSumState",
  "WeightPreset",
  "Weighting",
  "adaptive_loss_balancing",
  "aligned_mtl",
  "cagrad",
  "config",
  "create",
  "crmogm",
  "dualproj",
  "excess_mtl",
  "fairgrad",
  "from_weighting",
  "graddrop",
  "gradvac",
  "imtl_g",
  "krum",
  "mgda",
  "modo",
  "names",
  "nash_mtl",
  "options",
  "osgd",
  "osgd_sgd",
  "pcd",
  "pcgrad",
  "random_weighting",
  "sdmgrad",
  "switch_to_sum",
  "trimmed_mean",
  "upgrad",
  "weighted_sum",
  "weighting",
  "weighting_names",
]
