"""Weightings: pure functions from a K×K Gram matrix to K weights.

Every aggregator of the library combines the per-exit gradients ``g_k`` (the
rows of G) as ``u = Σ_k w_k g_k = wᵀ G``, with weights ``w`` computed from
the Gram matrix ``M = G Gᵀ`` alone (``docs/design.md``, "The maths"). A
*weighting* is that map ``M -> w``: a pure, jittable function of a ``(K, K)``
array returning a ``(K,)`` array. :func:`osgd_jax.from_weighting` turns any
weighting into an Optax transformation (one pass over the gradients for the
Gram matrices, one for the weighted sum), and every transformation of the
library, OSGD included, is built that way.

Some weightings read more than the Gram matrix; they take it as keyword
arguments, and their transformations supply it from the Optax state or from
the update's extra arguments:

========================  ======================================================
weighting                 extra input, and what supplies it
========================  ======================================================
:func:`sdn`               ``progress`` (step / total), from the step count in
                          the state of :func:`~osgd_jax.weighted_sum`
:func:`adaloss`           ``losses`` (running averages), from an EMA in the
                          state of :func:`~osgd_jax.adaptive_loss_balancing`,
                          fed by ``update(..., losses=)``
:func:`pcgrad`            ``key`` (the visiting orders), from a PRNG key in the
                          state of :func:`~osgd_jax.pcgrad`
:func:`random_weighting`  ``key``, from a PRNG key in the state of
                          :func:`~osgd_jax.random_weighting`
:func:`gradvac`           ``target`` and ``key``, from the state of
                          :func:`~osgd_jax.gradvac`; it returns the new
                          ``target``
:func:`modo`              ``previous`` (last weights), from the state of
                          :func:`~osgd_jax.modo`
:func:`sdmgrad`           ``previous``, from the state of
                          :func:`~osgd_jax.sdmgrad`; it returns the next
:func:`pcd`               ``scales`` (1/√EMA of ‖g_k‖²), from the state of
                          :func:`~osgd_jax.pcd`
========================  ======================================================

The weightings of TorchJD 0.18 are all here under their papers' names
(``mean``, ``constant``, ``random_weighting``, ``imtl_g``, ``aligned_mtl``,
``krum``, ``dualproj``, ``gradvac``, ``cagrad``, ``config``, ``fairgrad``,
``modo``, ``sdmgrad``, ``pcd``, ``nash_mtl``, besides ``uniform`` (its
``Sum``), ``mgda``, ``upgrad`` and ``pcgrad``). CR-MOGM smooths any
weighting (:func:`osgd_jax.crmogm`, which also takes the name of any
aggregator in :func:`osgd_jax.aggregation.weighting_names`). TrimmedMean,
GradDrop and ExcessMTL read every coordinate of the gradients, so they are
transformations only (:func:`osgd_jax.trimmed_mean`,
:func:`osgd_jax.graddrop`, :func:`osgd_jax.excess_mtl`).

Example: a user-defined weighting, here exit k weighted by its share of the
total squared gradient norm, as an Optax transformation::

  import jax.numpy as jnp, optax, osgd_jax

  def by_norm(gram):
    sq = jnp.diagonal(gram)
    return gram.shape[-1] * sq / jnp.maximum(sq.sum(), 1e-30)

  tx = optax.chain(osgd_jax.from_weighting(by_norm, num_exits=4),
                   optax.sgd(0.1, momentum=0.9))
"""

from osgd_jax.aggregation._adaloss import adaloss_weighting as adaloss
from osgd_jax.aggregation._aligned_mtl import (
  aligned_mtl_weighting as aligned_mtl,
)
from osgd_jax.aggregation._cagrad import cagrad_weighting as cagrad
from osgd_jax.aggregation._config import config_weighting as config
from osgd_jax.aggregation._dualproj import dualproj_weighting as dualproj
from osgd_jax.aggregation._fairgrad import fairgrad_weighting as fairgrad
from osgd_jax.aggregation._gradvac import gradvac_weighting as gradvac
from osgd_jax.aggregation._imtl_g import imtl_g_weighting as imtl_g
from osgd_jax.aggregation._krum import krum_weighting as krum
from osgd_jax.aggregation._mgda import mgda_weighting as mgda
from osgd_jax.aggregation._modo import modo_weighting as modo
from osgd_jax.aggregation._nash_mtl import nash_mtl_weighting as nash_mtl
from osgd_jax.aggregation._osgd import osgd_weighting as osgd
from osgd_jax.aggregation._pcd import pcd_weighting as pcd
from osgd_jax.aggregation._pcgrad import pcgrad_weighting as pcgrad
from osgd_jax.aggregation._random_weighting import (
  random_softmax_weighting as random_weighting,
)
from osgd_jax.aggregation._sdmgrad import sdmgrad_weighting as sdmgrad
from osgd_jax.aggregation._types import Weighting
from osgd_jax.aggregation._upgrad import upgrad_weighting as upgrad
from osgd_jax.aggregation._weighted_sum import constant_weighting as constant
from osgd_jax.aggregation._weighted_sum import geometric_weighting as geometric
from osgd_jax.aggregation._weighted_sum import linear_weighting as linear
from osgd_jax.aggregation._weighted_sum import mean_weighting as mean
from osgd_jax.aggregation._weighted_sum import sdn_weighting as sdn
from osgd_jax.aggregation._weighted_sum import uniform_weighting as uniform

__all__ = [
  "Weighting",
  "adaloss",
  "aligned_mtl",
  "cagrad",
  "config",
  "constant",
  "dualproj",
  "fairgrad",
  "geometric",
  "gradvac",
  "imtl_g",
  "krum",
  "linear",
  "mean",
  "mgda",
  "modo",
  "nash_mtl",
  "osgd",
  "pcd",
  "pcgrad",
  "random_weighting",
  "sdmgrad",
  "sdn",
  "uniform",
  "upgrad",
]
