"""Building, caching and loading the native CPU kernel, and doing without it."""

from __future__ import annotations

import os
import pathlib
import platform
import stat
import subprocess
import sys
import textwrap

import jaxlib
import pytest

from osgd_jax import native


def _fake_compiler(directory: pathlib.Path, body: str) -> str:
  """A shell script standing in for the C++ compiler."""
  script = directory / "fake-cxx"
  script.write_text("#!/bin/sh\n" + textwrap.dedent(body))
  script.chmod(script.stat().st_mode | stat.S_IXUSR)
  return str(script)


def test_the_kernel_is_built_cached_and_registered():
  assert native.available()
  path = native.library_path()
  assert path.exists() and path.parent == native.cache_dir()
  assert native.available()  # decided once per process


def test_the_cache_key_follows_jaxlib_and_the_compiler(monkeypatch):
  first = native.library_path()
  monkeypatch.setattr(jaxlib, "__version__", "0.0.0-other")
  second = native.library_path()
  monkeypatch.setenv("CXX", "clang++")
  third = native.library_path()
  assert len({first, second, third}) == 3


def test_a_missing_compiler_is_named(tmp_path, monkeypatch):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler .*no-such-compiler"):
    native.build(tmp_path / "lib.so")


def test_a_failed_build_leaves_no_file_behind(tmp_path, monkeypatch):
  # The fake compiler writes half a library to its -o path, then fails.
  compiler = _fake_compiler(tmp_path, """\
      while [ "$#" -gt 0 ]; do
        if [ "$1" = "-o" ]; then echo partial > "$2"; fi; shift
      done
      echo "gram_cpu.cc:1: error: something is wrong" >&2
      exit 1
      """)
  monkeypatch.setenv("CXX", compiler)
  out = tmp_path / "cache" / "lib.so"
  with pytest.raises(RuntimeError, match="(?s)exit 1.*something is wrong"):
    native.build(out)
  assert list(out.parent.iterdir()) == []  # neither the library nor a temp


def test_a_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch):
  monkeypatch.setattr(native, "_state", {})
  monkeypatch.setenv("OSGD_JAX_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", _fake_compiler(tmp_path, "exit 3\n"))
  with pytest.warns(RuntimeWarning, match="XLA's .* kernels are used instead"):
    assert not native.available()
  assert not native.available()  # decided: no second build, no warning


def test_the_environment_turns_it_off(monkeypatch):
  monkeypatch.setattr(native, "_state", {})
  monkeypatch.setenv("OSGD_JAX_NATIVE", "0")
  assert not native.available()


def test_osgd_without_the_native_kernel_in_a_fresh_process(tmp_path):
  """The whole library works without a compiler: XLA's kernels take over."""
  code = textwrap.dedent("""\
      import warnings
      import jax, jax.numpy as jnp, numpy as np, osgd_jax
      from osgd_jax import native
      warnings.simplefilter("error")  # falling back must not warn here
      g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((3, 50, 4)),
                            jnp.float32)}
      p = {"w": jnp.zeros((50, 4))}
      tx = osgd_jax.osgd()
      lowered = jax.jit(tx.update).lower(g, tx.init(p), p)
      assert "osgd_jax_grams" not in lowered.compile().as_text()
      out, _ = tx.update(g, tx.init(p), p)
      rows = np.asarray(g["w"], np.float64).reshape(3, -1)
      # exit 1 passes unchanged: the sum minus exit 1 is orthogonal to it
      rest = np.asarray(out["w"], np.float64).ravel() - rows[0]
      assert abs(rest @ rows[0]) < 1e-4 * (rows[0] @ rows[0]), rest @ rows[0]
      assert not native.available()
      print("ok")
      """)
  env = dict(os.environ, OSGD_JAX_NATIVE="0",
             OSGD_JAX_CACHE_DIR=str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", code], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "ok"
  assert list(tmp_path.iterdir()) == []  # nothing was built


def test_an_unwritable_cache_is_named_in_the_warning(tmp_path, monkeypatch):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a directory")
  monkeypatch.setattr(native, "_state", {})
  monkeypatch.setenv("OSGD_JAX_CACHE_DIR", str(blocker / "cache"))
  with pytest.warns(RuntimeWarning, match="OSGD_JAX_CACHE_DIR at a writable"
                    ".*a-file/cache"):
    assert not native.available()


def test_the_cache_key_follows_the_cpu(monkeypatch):
  first = native.library_path()
  monkeypatch.setattr(native, "_cpu_identity", lambda: "x86_64|flags=sse2")
  assert native.library_path() != first


def test_the_cpu_identity_names_its_instruction_sets():
  identity = native._cpu_identity()
  assert identity.startswith(platform.machine())
  if pathlib.Path("/proc/cpuinfo").exists():
    assert "flags=" in identity or "Features=" in identity


def test_a_compiler_without_march_native_builds_for_its_default(
    tmp_path, monkeypatch):
  # Refuses -march=native the way a cross or non-GCC compiler might; the
  # second try, without it, writes the library.
  log = tmp_path / "calls"
  compiler = _fake_compiler(tmp_path, f"""\
      echo "$*" >> {log}
      case " $* " in *" -march=native "*)
        echo "error: unsupported option -march=native" >&2; exit 1;; esac
      while [ "$#" -gt 0 ]; do
        if [ "$1" = "-o" ]; then echo library > "$2"; fi; shift
      done
      """)
  monkeypatch.setenv("CXX", compiler)
  out = tmp_path / "cache" / "lib.so"
  native.build(out)
  assert out.read_text() == "library\n"
  first, second = log.read_text().splitlines()
  assert "-march=native" in first and "-march=native" not in second
  assert sorted(p.name for p in out.parent.iterdir()) == ["lib.so"]


def test_supports_bounds_k_and_the_dtype():
  assert native.available()
  for targets in (native.TARGETS, native.LDL_TARGETS):
    assert native.supports(targets, "float32", 1)
    assert native.supports(targets, "float64", native.MAX_EXITS)
    assert not native.supports(targets, "float32", native.MAX_EXITS + 1)
    assert not native.supports(targets, "float32", 0)
    assert not native.supports(targets, "bfloat16", 4)


def test_may_run_on_cpu_arrays_but_not_under_explicit_mesh_axes():
  import jax
  import numpy as np
  from jax.sharding import AxisType, NamedSharding, PartitionSpec
  assert native.may_run_on(np.ones(3, np.float32))
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    x = jax.device_put(np.ones((jax.device_count(), 2), np.float32),
                       NamedSharding(mesh, PartitionSpec("data")))
    assert not native.may_run_on(x)
