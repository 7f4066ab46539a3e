"""Every factory's hyperparameters are range-checked at construction.

Issue 29, point 3: a bad value (out of range, NaN, infinite, or of the
wrong kind) is one ``ValueError`` naming the factory, the parameter, the
value and the valid range, raised before anything is traced. The table
below has a bad value for every parameter of every public factory (NaN too
for every real-valued one), and ``test_every_parameter_is_in_the_table``
keeps it complete when a factory gains a parameter. Construction only: no
test here compiles anything.
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import optax
import pytest

from osgd_jax import aggregation

NAN = float("nan")
INF = float("inf")
BIG = 2**31  # one past the int32 step count and loop bounds

FACTORIES = {
  name: getattr(aggregation, name)
  for name in aggregation.__all__
  if inspect.isfunction(getattr(aggregation, name))
  and name not in ("create", "names", "options", "weighting", "weighting_names")
}

# The arguments each factory is built with, besides the one under test.
BASE: dict[str, dict] = {name: {"num_exits": 3} for name in FACTORIES}
BASE["osgd_sgd"] = {"learning_rate": 0.1, "num_exits": 3}
BASE["crmogm"] = {"weighting": "upgrad", "num_exits": 3}
BASE["from_weighting"] = {"weighting": lambda m: m[0], "num_exits": 3}
BASE["weighted_sum"] = {"weights": "uniform", "num_exits": 3}
BASE["switch_to_sum"] = {
  "aggregator": aggregation.mgda(3),
  "after_steps": 10,
}


def _fraction(owner, name, value):
  return f"{owner}: {name} must be in [0, 1), got {value!r}."


def _unit(owner, name, value):
  return f"{owner}: {name} must be in [0, 1], got {value!r}."


def _nonneg(owner, name, value):
  return f"{owner}: {name} must be a finite number >= 0, got {value!r}."


def _positive(owner, name, value):
  return f"{owner}: {name} must be a finite number > 0, got {value!r}."


def _finite(owner, name, value):
  return f"{owner}: {name} must be a finite number, got {value!r}"


def _pos_int(owner, name, value):
  return (
    f"{owner}: {name} must be a positive int (at most 2**31 - 1), got"
    f" {value!r}."
  )


def _count(owner, name, value):
  return (
    f"{owner}: {name} must be an int >= 0 (at most 2**31 - 1), got {value!r}."
  )


def _seed(owner, value):
  return f"{owner}: seed must be an int in [-2**63, 2**63 - 1], got {value!r}"


def _flag(owner, name, value):
  return f"{owner}: {name} must be True or False, got {value!r}."


def _choice(name):
  return f"{name} must be one of ("


def _pref(owner, value):
  return (
    f"{owner}: pref_vector must be 3 finite numbers (one per exit,"
    f" num_exits=3), got {value!r}."
  )


# (factory, {parameter: bad value, ...}, message). A case may set other
# parameters too (a preset whose option is under test); the first key is
# the parameter under test.
CASES: list[tuple[str, dict, str]] = []


def case(factory: str, message: str, **kwargs) -> None:
  CASES.append((factory, kwargs, message))


# num_exits and granularity, everywhere they are taken.
for _name, _f in FACTORIES.items():
  _params = inspect.signature(_f).parameters
  if "num_exits" in _params:
    case(_name, "num_exits must be a positive int", num_exits=0)
  if "granularity" in _params:
    case(_name, _choice("granularity"), granularity="layer")

case("adaptive_loss_balancing", "decay must be in [0, 1), got 1.0", decay=1.0)
case("adaptive_loss_balancing", "decay must be in [0, 1), got nan", decay=NAN)
case("adaptive_loss_balancing", "eps must be a finite number > 0", eps=0.0)
case("adaptive_loss_balancing", "eps must be a finite number > 0", eps=NAN)
case("aligned_mtl", _pref("aligned_mtl", [1, NAN, 1]), pref_vector=[1, NAN, 1])
case("aligned_mtl", "scale_mode must be one of (", scale_mode="max")
case("cagrad", _nonneg("cagrad", "c", -0.1), c=-0.1)
case("cagrad", _nonneg("cagrad", "c", NAN), c=NAN)
case("cagrad", _nonneg("cagrad", "norm_eps", -1.0), norm_eps=-1.0)
case("cagrad", _pos_int("cagrad", "bisections", 0), bisections=0)
case("cagrad", _pos_int("cagrad", "max_iter", BIG), max_iter=BIG)
case("cagrad", _fraction("cagrad", "tol", 1.0), tol=1.0)
case("cagrad", _fraction("cagrad", "tol", NAN), tol=NAN)
case("config", _pref("config", [0.5, 0.5]), pref_vector=[0.5, 0.5])
case("crmogm", _unit("crmogm", "alpha", 1.5), alpha=1.5)
case("crmogm", _unit("crmogm", "alpha", NAN), alpha=NAN)
case("crmogm", "unknown", weighting="no-such-weighting")
case("dualproj", _pref("dualproj", [1, 1, INF]), pref_vector=[1, 1, INF])
case("dualproj", _pos_int("dualproj", "max_iter", 0), max_iter=0)
case("dualproj", _fraction("dualproj", "tol", -1e-3), tol=-1e-3)
case(
  "excess_mtl",
  _positive("excess_mtl", "robust_step_size", 0.0),
  robust_step_size=0.0,
)
case(
  "excess_mtl",
  _positive("excess_mtl", "robust_step_size", NAN),
  robust_step_size=NAN,
)
case(
  "excess_mtl", _count("excess_mtl", "n_warmup_steps", -1), n_warmup_steps=-1
)
case(
  "excess_mtl", _count("excess_mtl", "n_warmup_steps", 2.0), n_warmup_steps=2.0
)
case("fairgrad", _nonneg("fairgrad", "alpha", -1.0), alpha=-1.0)
case("fairgrad", _nonneg("fairgrad", "alpha", NAN), alpha=NAN)
case("fairgrad", _pos_int("fairgrad", "max_iter", 0), max_iter=0)
case(
  "from_weighting",
  _finite("from_weighting", "gram_degree", NAN),
  gram_degree=NAN,
)
case("from_weighting", "weighting must be a function", weighting="upgrad")
case("graddrop", "leak must be 3 numbers in [0, 1]", leak=[0.5, 2.0, 0.0])
case("graddrop", "leak must be 3 numbers in [0, 1]", leak=[NAN, 0.0, 0.0])
case("graddrop", _seed("graddrop", 0.5), seed=0.5)
case("graddrop", _seed("graddrop", NAN), seed=NAN)
case("graddrop", _seed("graddrop", None), seed=None)
case("gradvac", _unit("gradvac", "beta", 1.5), beta=1.5)
case("gradvac", _unit("gradvac", "beta", NAN), beta=NAN)
case("gradvac", _nonneg("gradvac", "eps", -1.0), eps=-1.0)
case("gradvac", _seed("gradvac", 2**63), seed=2**63)
case("krum", _count("krum", "n_byzantine", -1), n_byzantine=-1)
case("krum", _pos_int("krum", "n_selected", 0), n_selected=0)
case("krum", "needs num_exits >= 4", n_byzantine=1)
case("mgda", _pos_int("mgda", "max_iter", 0), max_iter=0)
case("mgda", _fraction("mgda", "tol", NAN), tol=NAN)
case("modo", _positive("modo", "gamma", 0.0), gamma=0.0)
case("modo", _positive("modo", "gamma", NAN), gamma=NAN)
case("modo", _nonneg("modo", "rho", -1.0), rho=-1.0)
case("nash_mtl", _nonneg("nash_mtl", "max_norm", -1.0), max_norm=-1.0)
case("nash_mtl", _nonneg("nash_mtl", "max_norm", NAN), max_norm=NAN)
case(
  "nash_mtl",
  _pos_int("nash_mtl", "update_weights_every", 0),
  update_weights_every=0,
)
case("nash_mtl", _pos_int("nash_mtl", "max_iter", 0), max_iter=0)
case("osgd", "method must be one of (", method="qr2")
case("osgd", "order must be a permutation of range(K)", order=[0, 0, 1])
case("osgd", "order must be a sequence of ints", order=[0, INF, 1])
case("osgd", _fraction("osgd", "tol", 1.0), tol=1.0)
case("osgd", _fraction("osgd", "tol", NAN), tol=NAN)
case("osgd", _flag("osgd", "rescale", NAN), rescale=NAN)
case("osgd_sgd", _finite("osgd_sgd", "learning_rate", NAN), learning_rate=NAN)
case("osgd_sgd", _fraction("osgd_sgd", "momentum", 1.0), momentum=1.0)
case("osgd_sgd", _fraction("osgd_sgd", "momentum", NAN), momentum=NAN)
case("osgd_sgd", _flag("osgd_sgd", "nesterov", 1.5), nesterov=1.5)
case("osgd_sgd", _nonneg("osgd_sgd", "weight_decay", -1e-4), weight_decay=-1e-4)
case("osgd_sgd", "method must be one of (", method="qr2")
case("osgd_sgd", "order must be a sequence of ints", order=[0, 1, -INF])
case("osgd_sgd", _fraction("osgd", "tol", NAN), tol=NAN)
case("osgd_sgd", _flag("osgd", "rescale", "yes"), rescale="yes")
case(
  "osgd_sgd",
  "after_steps must be an integer >= 0 (at most 2**31 - 1), got -1",
  sgd_after=-1,
)
case(
  "osgd_sgd",
  f"after_steps must be an integer >= 0 (at most 2**31 - 1), got {BIG}",
  sgd_after=BIG,
)
case("pcd", "tau must be one number or 2", tau=1.5)
case("pcd", "tau must be one number or 2", tau=[NAN, 0.1])
case("pcd", _fraction("pcd", "beta", 1.0), beta=1.0)
case("pcd", _nonneg("pcd", "eps", NAN), eps=NAN)
case("pcd", _pos_int("pcd", "max_iter", 0), max_iter=0)
case("pcd", _fraction("pcd", "tol", 1.0), tol=1.0)
case("pcgrad", _seed("pcgrad", 0.5), seed=0.5)
case("random_weighting", _seed("random_weighting", NAN), seed=NAN)
case("sdmgrad", _positive("sdmgrad", "lr", 0.0), lr=0.0)
case("sdmgrad", _positive("sdmgrad", "lr", NAN), lr=NAN)
case("sdmgrad", _fraction("sdmgrad", "momentum", 1.0), momentum=1.0)
case("sdmgrad", _pos_int("sdmgrad", "n_iter", 0), n_iter=0)
case("sdmgrad", _nonneg("sdmgrad", "lambda_", -1.0), lambda_=-1.0)
case("sdmgrad", _pref("sdmgrad", [1, 2]), pref_vector=[1, 2])
case("switch_to_sum", "after_steps must be an integer >= 0", after_steps=NAN)
case("switch_to_sum", f"got {BIG}", after_steps=BIG)
case("switch_to_sum", "got 1.5", after_steps=1.5)
case(
  "trimmed_mean",
  "trim_number must be an int with 0 <= trim_number",
  trim_number=2,
)
case(
  "trimmed_mean",
  "trim_number must be an int with 0 <= trim_number",
  trim_number=-1,
)
case("upgrad", _pos_int("upgrad", "max_iter", 0), max_iter=0)
case("upgrad", _fraction("upgrad", "tol", NAN), tol=NAN)
case("weighted_sum", "unknown weighted_sum preset 'median'", weights="median")
case(
  "weighted_sum",
  "non-empty 1-D vector of finite numbers",
  weights=[1.0, NAN, 1.0],
)
case(
  "weighted_sum",
  _pos_int("weighted_sum", "total_steps", 0),
  total_steps=0,
  weights="sdn",
)
case(
  "weighted_sum",
  "needs finite caps >= 0, got nan",
  cap=NAN,
  weights="sdn",
  total_steps=10,
)
case(
  "weighted_sum",
  "needs finite caps >= 0, got -0.5",
  cap=-0.5,
  weights="sdn",
  total_steps=10,
)
case(
  "weighted_sum",
  _positive("weighted_sum", "ratio", 0.0),
  ratio=0.0,
  weights="geometric",
)
case(
  "weighted_sum",
  _positive("weighted_sum", "ratio", NAN),
  ratio=NAN,
  weights="geometric",
)

# Parameters that take any value of their type, or are checked by another
# row (the aggregator switch_to_sum wraps is already built and checked).
NOT_RANGED = {
  ("switch_to_sum", "aggregator"),
  ("from_weighting", "name"),
}


def _param(factory: str, kwargs: dict, message: str):
  name, value = next(iter(kwargs.items()))
  return pytest.param(
    factory, kwargs, message, id=f"{factory}-{name}={value!r}"
  )


@pytest.mark.parametrize("factory,kwargs,message", [_param(*c) for c in CASES])
def test_a_bad_value_is_named_with_its_range(factory, kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    FACTORIES[factory](**{**BASE[factory], **kwargs})


def test_every_parameter_is_in_the_table():
  """A parameter a factory gains must get a row here (or a reason)."""
  covered = {(f, next(iter(kw))) for f, kw, _ in CASES} | NOT_RANGED
  every = {
    (f, p)
    for f, fn in FACTORIES.items()
    for p in inspect.signature(fn).parameters
  }
  assert every - covered == set()


@pytest.mark.parametrize("factory", sorted(FACTORIES))
def test_the_base_arguments_build(factory):
  """The rows fail because of their bad value, not the base arguments."""
  assert isinstance(
    FACTORIES[factory](**BASE[factory]), optax.GradientTransformation
  )


def test_edge_values_of_each_range_are_accepted():
  """The closed ends of each range build; a negative seed is a seed."""
  aggregation.osgd_sgd(-0.1, momentum=0.0, weight_decay=0.0, num_exits=2)
  aggregation.osgd_sgd(
    0.1,
    momentum=None,
    nesterov=np.bool_(True),
    num_exits=2,
    sgd_after=2**31 - 1,
  )
  aggregation.gradvac(2, beta=1.0, seed=-1)
  aggregation.crmogm("mgda", 2, alpha=1.0)
  aggregation.pcgrad(2, seed=np.int64(2**63 - 1))
  aggregation.cagrad(2, c=0.0, max_iter=2**31 - 1)
  aggregation.graddrop(2, leak=[0.0, 1.0], seed=-(2**63))


def test_injected_hyperparameters_are_not_checked_at_construction():
  """Under inject_hyperparams numbers arrive as arrays and are left alone."""
  tx = optax.inject_hyperparams(aggregation.pcgrad, static_args=("num_exits",))(
    seed=3, num_exits=2
  )
  tx.init({"w": np.zeros(2, np.float32)})
  tx = optax.inject_hyperparams(
    aggregation.osgd_sgd, static_args=("num_exits",)
  )(learning_rate=0.1, momentum=0.5, nesterov=True, num_exits=2)
  tx.init({"w": np.zeros(2, np.float32)})
