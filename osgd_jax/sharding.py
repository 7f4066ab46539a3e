"""Mesh helpers for multi-device and multi-host training.

OSGD needs no code of its own to run sharded: every inner product of the
projection is a contraction over a leaf's trailing (parameter) axes, so when
the stacked gradients keep their parameters' sharding on those axes, XLA
computes each K×K Gram block as per-device partial sums plus one small
all-reduce, and the weighted sum ``Σ_k w_k g_k`` stays local to each shard.
The K axis is never split. This module supplies the rest of a sharded run:

* :func:`make_mesh` builds a ``(data, model)`` mesh from a spec such as
  ``"data=4,model=2"`` (the ``--mesh`` flag of ``osgd-train``);
* :func:`param_spec` is the parameter rule: split a leaf's largest dimension
  that the ``model`` axis divides, otherwise replicate it;
* :func:`shard_params` / :func:`constrain` place a pytree by that rule (or by
  given specs), :func:`stacked_shardings` gives the matching shardings of
  stacked ``(K, ...)`` gradients;
* :func:`shard_batch` splits a batch over the ``data`` axis, assembling it
  from each process's slice when there are several hosts;
* :func:`initialize_distributed` calls ``jax.distributed.initialize()`` when
  the launcher's environment variables say this is one of several processes.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from osgd_jax import sharding
  >>> mesh = sharding.make_mesh("data=-1,model=1")  # every device on data
  >>> params = sharding.shard_params({"w": jnp.zeros((8, 4))}, mesh)
  >>> params["w"].sharding.spec   # model=1: nothing to split, replicated
  P(None, None)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
  "DATA_AXIS",
  "MODEL_AXIS",
  "parse_mesh_spec",
  "make_mesh",
  "param_spec",
  "param_shardings",
  "shard_params",
  "constrain",
  "stacked_shardings",
  "batch_sharding",
  "shard_batch",
  "replicated",
  "explicit_mesh",
  "to_host",
  "initialize_distributed",
]

#: The mesh axis a batch is split over.
DATA_AXIS = "data"
#: The mesh axis every parameter is split over (on one of its dimensions).
MODEL_AXIS = "model"
_AXES = (DATA_AXIS, MODEL_AXIS)


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
  """Parses ``"data=4,model=2"`` into ``{"data": 4, "model": 2}``.

  An axis left out has size 1; one axis may be ``-1`` to take all the devices
  the other leaves (resolved by :func:`make_mesh`).

  Args:
    spec: the text of ``--mesh``, or a mapping of axis name to size.

  Returns:
    A dict with exactly the keys ``"data"`` and ``"model"``.

  Raises:
    ValueError: an unknown axis, a repeated axis, a size that is not a
      positive integer (or -1), or more than one -1.

  Example:
    >>> parse_mesh_spec("model=2")
    {'data': 1, 'model': 2}
  """
  if isinstance(spec, Mapping):
    items = [(str(k), v) for k, v in spec.items()]
  else:
    items = []
    for part in str(spec).replace(" ", "").split(","):
      if not part:
        continue
      name, sep, value = part.partition("=")
      if not sep:
        raise ValueError(
          f"bad mesh spec {spec!r}: {part!r} is not of the form axis=size;"
          " write e.g. --mesh data=4,model=2."
        )
      items.append((name, value))
  sizes: dict[str, int] = {}
  for name, value in items:
    if name not in _AXES:
      raise ValueError(
        f"bad mesh spec {spec!r}: unknown axis {name!r}; the axes are"
        f" {' and '.join(_AXES)}, e.g. --mesh data=4,model=2."
      )
    if name in sizes:
      raise ValueError(f"bad mesh spec {spec!r}: axis {name!r} given twice.")
    try:
      size = int(value)
    except (TypeError, ValueError):
      size = 0
    if (
      size == 0
      or size < -1
      or str(value).strip() not in (str(size), f"+{size}")
    ):
      raise ValueError(
        f"bad mesh spec {spec!r}: the size of {name!r} must be a positive"
        f" integer (or -1 for all remaining devices), got {value!r}."
      )
    sizes[name] = size
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"bad mesh spec {spec!r}: only one axis may be -1.")
  return {axis: sizes.get(axis, 1) for axis in _AXES}


def make_mesh(
  spec: str | Mapping[str, int] = "data=-1",
  devices: Sequence[Any] | None = None,
) -> Mesh:
  """Builds the ``(data, model)`` device mesh described by ``spec``.

  The axes are ``Auto`` (XLA propagates shardings inside ``jit``); the
  library's kernels also accept arrays on meshes with ``Explicit`` axes.

  Args:
    spec: see :func:`parse_mesh_spec`; the default puts every device on the
      data axis.
    devices: the devices to use (default: all of ``jax.devices()``, over every
      process).

  Returns:
    A :class:`jax.sharding.Mesh` with axes ``("data", "model")``.

  Raises:
    ValueError: the axis sizes do not multiply to the number of devices.

  Example:
    >>> mesh = make_mesh("data=-1")
    >>> mesh.axis_names
    ('data', 'model')
  """
  sizes = parse_mesh_spec(spec)
  devices = list(jax.devices() if devices is None else devices)
  count = len(devices)
  known = math.prod(s for s in sizes.values() if s != -1)
  for axis, size in sizes.items():
    if size == -1:
      if count % known:
        raise ValueError(
          f"mesh {spec!r}: the other axes use {known} devices, which does"
          f" not divide the {count} devices available."
        )
      sizes[axis] = count // known
  shape = tuple(sizes[a] for a in _AXES)
  if math.prod(shape) != count:
    raise ValueError(
      f"mesh {spec!r} needs {math.prod(shape)} devices but {count} are"
      f" available ({devices[0].platform}); make data×model equal"
      f" {count}, or use -1 for one axis (e.g. --mesh data=-1,model=2)."
    )
  return jax.make_mesh(
    shape, _AXES, axis_types=(AxisType.Auto,) * 2, devices=devices
  )


def param_spec(shape: Sequence[int], model_size: int) -> PartitionSpec:
  """The partition rule: split the largest dimension the model axis divides.

  Ties go to the earliest such dimension; a leaf with no divisible dimension
  (or ``model_size == 1``) is replicated. The rule depends only on the shape,
  so optimizer states shaped like a parameter get that parameter's sharding.

  Args:
    shape: the leaf's shape.
    model_size: the size of the mesh's ``model`` axis.

  Returns:
    A ``PartitionSpec`` with ``"model"`` on at most one dimension.

  Example:
    >>> param_spec((3, 3, 16, 32), 2)
    P(None, None, None, 'model')
  """
  spec: list[str | None] = [None] * len(shape)
  if model_size > 1:
    best = None
    for dim, size in enumerate(shape):
      if size % model_size == 0 and (best is None or size > shape[best]):
        best = dim
    if best is not None:
      spec[best] = MODEL_AXIS
  return PartitionSpec(*spec)


def _path_name(path: Any) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def _check_divides(
  path: Any, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh
) -> None:
  """Raises a ``ValueError`` if ``spec`` splits a dimension unevenly."""
  if len(spec) > len(shape):
    raise ValueError(
      f"leaf {_path_name(path)} has shape {tuple(shape)} but its partition"
      f" spec {spec} names {len(spec)} dimensions."
    )
  for dim, axes in enumerate(spec):
    if axes is None:
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    ways = math.prod(mesh.shape[a] for a in names)
    if shape[dim] % ways:
      raise ValueError(
        f"leaf {_path_name(path)} of shape {tuple(shape)}: dimension {dim}"
        f" (size {shape[dim]}) does not divide evenly over mesh axes"
        f" {names} ({ways} devices). Shard another dimension, replicate"
        " this one (None), or change --mesh."
      )


def param_shardings(tree: Any, mesh: Mesh, specs: Any | None = None) -> Any:
  """The ``NamedSharding`` of every leaf of ``tree``.

  Args:
    tree: a pytree of arrays (or anything with ``.shape``).
    mesh: a mesh with a ``model`` axis.
    specs: optional pytree of ``PartitionSpec`` matching ``tree``; the default
      is :func:`param_spec` per leaf.

  Returns:
    A pytree of ``NamedSharding`` with ``tree``'s structure.

  Raises:
    ValueError: a given spec splits a dimension that its mesh axes do not
      divide; the message names the leaf.
  """
  model_size = mesh.shape.get(MODEL_AXIS, 1)
  if specs is None:
    return jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(np.shape(x), model_size)), tree
    )

  def one(path, x, spec):
    _check_divides(path, np.shape(x), spec, mesh)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(
    one, tree, specs, is_leaf=lambda s: isinstance(s, PartitionSpec)
  )


def shard_params(tree: Any, mesh: Mesh, specs: Any | None = None) -> Any:
  """Places every leaf of ``tree`` on ``mesh`` by the parameter rule.

  Works for parameters, BatchNorm statistics and optimizer states alike:
  arrays of a parameter's shape get that parameter's sharding.

  Args:
    tree: a pytree of arrays, e.g. an ``nnx.State``.
    mesh: the device mesh.
    specs: optional pytree of ``PartitionSpec`` overriding the rule.

  Returns:
    ``tree`` with every leaf a global ``jax.Array`` sharded over ``mesh``.

  Raises:
    ValueError: a given spec does not divide its leaf (see
      :func:`param_shardings`).

  Example:
    >>> mesh = make_mesh("data=-1")
    >>> shard_params({"b": np.zeros(3)}, mesh)["b"].shape
    (3,)
  """
  shardings = param_shardings(tree, mesh, specs)
  return jax.tree.map(_put, tree, shardings)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.device_put(x, sharding)  # already global: reshard in place
  dtype = getattr(x, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    # Typed PRNG keys have no NumPy form: place their raw data, then rewrap.
    data = _put(
      jax.random.key_data(x),
      NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec, None)),
    )
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(x)
  # Every process holds the whole value; each places only its own shards.
  return jax.make_array_from_callback(
    host.shape, sharding, lambda index: host[index]
  )


def to_host(tree: Any) -> Any:
  """NumPy copies of every leaf, gathering the shards of other processes.

  Args:
    tree: a pytree of arrays, possibly sharded over several processes.

  Returns:
    The same pytree of full ``np.ndarray`` values, on every process.
  """
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def constrain(tree: Any, mesh: Mesh, *, stacked: bool = False) -> Any:
  """``with_sharding_constraint`` of every leaf to the parameter rule.

  For use inside ``jit``: it pins updated parameters and optimizer states to
  the sharding :func:`shard_params` gave them, whatever XLA would propagate.

  Args:
    tree: a pytree of traced arrays.
    mesh: the device mesh.
    stacked: the leaves are stacked per-exit gradients ``(K, *param.shape)``:
      the rule applies to the parameter axes and K stays whole.

  Returns:
    ``tree``, constrained.
  """
  model_size = mesh.shape.get(MODEL_AXIS, 1)

  def one(x):
    if stacked:
      spec = PartitionSpec(None, *param_spec(x.shape[1:], model_size))
    else:
      spec = param_spec(x.shape, model_size)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  return jax.tree.map(one, tree)


def stacked_shardings(shardings: Any) -> Any:
  """The shardings of stacked ``(K, ...)`` gradients of parameters so sharded.

  The K axis is never split; the trailing axes keep the parameter's spec.

  Args:
    shardings: a pytree of ``NamedSharding`` (e.g. from
      :func:`param_shardings`).

  Returns:
    The same pytree with ``None`` prepended to every spec.
  """
  return jax.tree.map(
    lambda s: NamedSharding(s.mesh, PartitionSpec(None, *s.spec)),
    shardings,
    is_leaf=lambda s: isinstance(s, NamedSharding),
  )


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a full copy on every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def explicit_mesh(x: Any) -> jax.sharding.AbstractMesh | None:
  """The (abstract) mesh with ``Explicit`` axes that ``x``'s type carries.

  Under such a mesh JAX types every array's sharding and each operation must
  follow it; under ``Auto`` axes, or without a mesh, XLA's partitioner
  chooses shardings itself.

  Args:
    x: an array or a tracer.

  Returns:
    The abstract mesh of ``x``'s type, or ``None`` (no mesh, or no
    ``Explicit`` axis).

  Example:
    >>> import jax.numpy as jnp
    >>> explicit_mesh(jnp.ones(3)) is None
    True
  """
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  return mesh if mesh is not None and mesh.explicit_axes else None


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits an array's leading (batch) axis over the ``data`` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Assembles a global batch, split over ``data``, from this process's part.

  With one process, ``batch`` is the whole batch. With several, every process
  passes its own contiguous slice (``iterate_batches(...,
  process_index=jax.process_index(), process_count=jax.process_count())``
  yields exactly that) and the result is one global array.

  Args:
    batch: a pytree of host arrays whose leading axis is the local batch.
    mesh: the device mesh.

  Returns:
    The pytree of global ``jax.Array`` sharded by :func:`batch_sharding`.

  Raises:
    ValueError: the global batch does not divide over the data axis.
  """
  sharding = batch_sharding(mesh)
  data_size = mesh.shape[DATA_AXIS]
  processes = jax.process_count()

  def one(x):
    x = np.asarray(x)
    global_batch = x.shape[0] * processes
    if global_batch % data_size:
      raise ValueError(
        f"the batch of {global_batch} examples does not divide over the"
        f" {data_size} devices of the data axis; use a --batch-size that is"
        f" a multiple of {data_size}."
      )
    return jax.make_array_from_process_local_data(
      sharding, x, (global_batch,) + x.shape[1:]
    )

  return jax.tree.map(one, batch)


# Launchers whose environment jax.distributed.initialize() reads by itself.
_MANAGED_CLUSTERS = {
  "TPU_WORKER_HOSTNAMES": "a Cloud TPU pod slice",
  "SLURM_JOB_ID": "a Slurm job",
  "OMPI_MCA_orte_hnp_uri": "Open MPI (mpirun)",
}


def _env_int(name: str) -> int:
  value = os.environ.get(name)
  try:
    return int(value)  # type: ignore[arg-type]
  except (TypeError, ValueError):
    raise ValueError(
      f"JAX_COORDINATOR_ADDRESS is set, so {name} must be an integer too"
      f" (got {value!r}); export JAX_NUM_PROCESSES and JAX_PROCESS_ID on"
      " every process."
    ) from None


def _several_processes_launched() -> bool:
  if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
    return True
  if "SLURM_JOB_ID" in os.environ:
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
  if "OMPI_MCA_orte_hnp_uri" in os.environ:
    return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
  return False


def initialize_distributed() -> bool:
  """Joins a multi-process run when the environment describes one.

  Call it before any other JAX call. It calls
  ``jax.distributed.initialize()``:

  * with ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` when they are set (e.g. one
    process per GPU of a node, or a hand-launched cluster);
  * with JAX's own cluster detection on a Cloud TPU pod slice
    (``TPU_WORKER_HOSTNAMES`` lists several hosts), under Slurm with several
    tasks, or under Open MPI with several ranks.

  Otherwise, and when already initialised, it does nothing.

  Returns:
    Whether this process is (now) part of a multi-process run.

  Raises:
    ValueError: ``JAX_COORDINATOR_ADDRESS`` is set without valid
      ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``.

  Example:
    >>> initialize_distributed()   # a single process: nothing to do
    False
  """
  if jax.distributed.is_initialized():
    return True
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    num_processes = _env_int("JAX_NUM_PROCESSES")
    process_id = _env_int("JAX_PROCESS_ID")
    if not 0 <= process_id < num_processes:
      raise ValueError(
        f"JAX_PROCESS_ID={process_id} must be in [0, JAX_NUM_PROCESSES="
        f"{num_processes})."
      )
    jax.distributed.initialize(
      address, num_processes=num_processes, process_id=process_id
    )
    return True
  if _several_processes_launched():
    jax.distributed.initialize()
    return True
  return False
