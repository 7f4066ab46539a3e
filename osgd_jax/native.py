"""The library's native CPU kernels: built on first use, loaded, registered.

``osgd_jax/csrc/gram_cpu.cc`` computes the Gram matrices of stacked leaves,
``osgd_jax/csrc/ldl_cpu.cc`` the Gram–Schmidt weights from them and
``osgd_jax/csrc/conv_cpu.cc`` a convolution's weight gradient, as XLA FFI
handlers (why kernels of our own: see those files, :mod:`osgd_jax.cpu_gram`,
:mod:`osgd_jax.cpu_ldl` and :mod:`osgd_jax.cpu_conv`). All go into one
shared library, compiled against the XLA FFI headers of the
*installed* jaxlib (``jax.ffi.include_dir()``), the first time a process
needs it, by the system C++ compiler, the way PyTorch's inductor compiles
its CPU kernels; the shared library is cached on disk, keyed by the source,
the jaxlib version, the compiler and its flags and the CPU, so later
processes only load it. It is compiled for the CPU it runs on
(``-march=native``, or the compiler's default target where that flag is
refused): the Gram and conv kernels' register blocking depends on the SIMD
registers the CPU has.

Everything here degrades gracefully: without a compiler, with an older
jaxlib, or with ``OSGD_JAX_NATIVE=0`` in the environment, :func:`available`
is ``False`` and XLA's own kernels compute the same results (slower on
CPU, equal up to rounding). A failed build
is reported once, as a warning that carries the compiler's message.

Environment variables:

* ``OSGD_JAX_NATIVE``: ``0`` turns the kernels off (default: on).
* ``OSGD_JAX_CACHE_DIR``: where built libraries are kept (default:
  ``$XDG_CACHE_HOME/osgd_jax`` or ``~/.cache/osgd_jax``).
* ``CXX``: the C++ compiler (default: ``c++``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax
import jaxlib
import numpy as np

from osgd_jax import sharding

__all__ = ["available", "build", "cache_dir", "library_path", "may_run_on",
           "supports", "CONV_TARGETS", "HEADERS", "LDL_TARGETS", "MAX_EXITS",
           "SOURCES", "TARGETS"]

SOURCES = tuple(pathlib.Path(__file__).parent / "csrc" / name
                for name in ("gram_cpu.cc", "ldl_cpu.cc", "conv_cpu.cc"))
# Included by the sources: part of the cache key too.
HEADERS = tuple(pathlib.Path(__file__).parent / "csrc" / name
                for name in ("parallel.h", "simd.h"))
# FFI target name per compute dtype, and the handler symbol behind it: the
# Gram matrices, the Gram–Schmidt weights ...
TARGETS = {"float32": ("osgd_jax_grams_f32", "OsgdGramsF32"),
           "float64": ("osgd_jax_grams_f64", "OsgdGramsF64")}
LDL_TARGETS = {"float32": ("osgd_jax_ldl_f32", "OsgdLdlF32"),
               "float64": ("osgd_jax_ldl_f64", "OsgdLdlF64")}
# ... and a 2-D convolution's weight gradient.
CONV_TARGETS = {"float32": ("osgd_jax_conv_dw_f32", "OsgdConvWeightGradF32"),
                "float64": ("osgd_jax_conv_dw_f64", "OsgdConvWeightGradF64")}
# The most exits the Gram and LDLᵀ kernels take (kMaxExits, kMaxExitsLdl in
# the sources).
MAX_EXITS = 64
# -fno-math-errno: sqrt need not set errno, so loops with it vectorise.
CXXFLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-fno-math-errno")
# Tried first; a compiler that refuses it builds for its default target.
NATIVE_FLAGS = ("-march=native",)
BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once decided; "path"; "error"


def cache_dir() -> pathlib.Path:
  """The directory that holds built libraries (see the module docstring)."""
  explicit = os.environ.get("OSGD_JAX_CACHE_DIR")
  if explicit:
    return pathlib.Path(explicit)
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "osgd_jax"


def _compiler() -> str:
  return os.environ.get("CXX", "c++")


def _cpu_identity() -> str:
  """The CPU's model and instruction-set flags, as the OS reports them.

  Part of the cache key: a library built with ``-march=native`` may use
  instructions another CPU lacks (a cache directory shared over a network).
  """
  seen = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        name, _, value = line.partition(":")
        name = name.strip()
        if name in ("model name", "flags", "Features", "CPU part"):
          seen.setdefault(name, value.strip())
  except OSError:
    pass
  return "|".join([platform.machine(), platform.processor(),
                   *(f"{k}={v}" for k, v in sorted(seen.items()))])


def library_path() -> pathlib.Path:
  """Where the library for these sources, jaxlib, compiler, flags and CPU lives."""
  key = hashlib.sha256()
  for part in (*(source.read_bytes() for source in SOURCES + HEADERS),
               jaxlib.__version__.encode(),
               _compiler().encode(),
               " ".join(CXXFLAGS + NATIVE_FLAGS).encode(),
               _cpu_identity().encode()):
    key.update(part)
    key.update(b"\0")
  return cache_dir() / f"osgd_cpu-{key.hexdigest()[:16]}.so"


def build(path: pathlib.Path) -> None:
  """Compiles the kernels to ``path``, atomically.

  The compiler writes a temporary file in the same directory, which is then
  renamed: a process that loads ``path`` never sees half a library, and
  processes that build at the same time each rename a complete one.

  Args:
    path: the shared library to write.

  Raises:
    RuntimeError: no compiler, or the compiler failed (its message included).
  """
  compiler = shutil.which(_compiler())
  if compiler is None:
    raise RuntimeError(
        f"no C++ compiler {_compiler()!r} on PATH; install one (e.g. g++) or"
        " set CXX")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp",
                             dir=path.parent)
  os.close(fd)
  flags = [*CXXFLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o",
           tmp]
  try:
    # With NATIVE_FLAGS first, then without (a compiler that refuses them).
    for cmd in ([compiler, *NATIVE_FLAGS, *flags], [compiler, *flags]):
      proc = subprocess.run(cmd, capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT_S, check=False)
      if proc.returncode == 0:
        break
    else:
      raise RuntimeError(
          f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
          f"{proc.stderr[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _load() -> None:
  if os.environ.get("OSGD_JAX_NATIVE", "1").strip().lower() in ("0", "false",
                                                               "no", "off"):
    _state.update(ok=False, error="turned off by OSGD_JAX_NATIVE")
    return
  path = library_path()
  try:
    if not path.exists():
      build(path)
    lib = ctypes.cdll.LoadLibrary(str(path))
    for target, symbol in (*TARGETS.values(), *LDL_TARGETS.values(),
                           *CONV_TARGETS.values()):
      jax.ffi.register_ffi_target(
          target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError,
          AttributeError) as err:
    _state.update(ok=False, error=str(err))
    warnings.warn(
        "osgd_jax: the native CPU kernels are unavailable, so XLA's"
        f" (slower on CPU) kernels are used instead. Reason: {err}. To fix:"
        " install a C++ compiler or point CXX at one, and OSGD_JAX_CACHE_DIR"
        f" at a writable directory (now {cache_dir()}); OSGD_JAX_NATIVE=0"
        " turns the kernels off without this warning.",
        RuntimeWarning, stacklevel=3)
    return
  _state.update(ok=True, path=path)


def available() -> bool:
  """Whether the native kernels are built, loaded and registered with XLA.

  The first call in a process builds (if not cached) and loads it; later
  calls return the same answer.

  Returns:
    ``True`` if the FFI targets in :data:`TARGETS`, :data:`LDL_TARGETS` and
    :data:`CONV_TARGETS` can be called.

  Example:
    >>> from osgd_jax import native
    >>> isinstance(native.available(), bool)
    True
  """
  with _lock:
    if "ok" not in _state:
      _load()
    return bool(_state["ok"])


def supports(targets: dict, dtype, num_exits: int) -> bool:
  """Whether a native kernel takes K exits in this dtype, and is loaded.

  Args:
    targets: :data:`TARGETS` (the Gram matrices) or :data:`LDL_TARGETS`.
    dtype: the dtype the kernel would compute in.
    num_exits: K.

  Returns:
    ``True`` when the kernel has a handler for the dtype, ``1 <= K <=``
    :data:`MAX_EXITS`, and :func:`available`.

  Example:
    >>> import numpy as np
    >>> from osgd_jax import native
    >>> native.supports(native.TARGETS, np.float16, 4)
    False
  """
  return (1 <= num_exits <= MAX_EXITS and np.dtype(dtype).name in targets
          and available())


def may_run_on(x) -> bool:
  """Whether a native kernel may take ``x`` in place of XLA's operations.

  On the CPU backend, and not under a mesh with ``Explicit`` axes
  (:func:`osgd_jax.sharding.explicit_mesh`), whose typed shardings a custom
  call cannot follow. Whether the kernel is built is :func:`available`'s
  (or :func:`supports`') answer.

  Args:
    x: an operand of the kernel (an array or a tracer).

  Returns:
    Whether the kernel may run on it.

  Example:
    >>> import jax.numpy as jnp
    >>> from osgd_jax import native
    >>> native.may_run_on(jnp.ones(3))  # on the CPU backend
    True
  """
  return jax.default_backend() == "cpu" and sharding.explicit_mesh(x) is None
