"""XLA settings for the whole test session: 8 CPU devices, cheap compiles.

XLA reads ``XLA_FLAGS`` once, when the first JAX backend starts, so the flags
are set here, before any test module touches a device; subprocesses started
by the tests (the CLI, notebooks, benchmarks, the two-process run) inherit
them.

* 8 host devices, for the multi-device tests (``tests/test_sharding.py``,
  ``tests/test_train_sharded.py``); single-device code runs on device 0.
* The suite is dominated by compile time, not run time: the tests compile
  hundreds of small programs and run each a few times. XLA:CPU's cheapest
  code generation (no LLVM optimisation passes, no fusion emitters, one
  code generation thread) spends less time compiling without changing what
  is computed. Set
  ``OSGD_TEST_OPTIMIZED_XLA=1`` to test with XLA's default settings.

A flag already present in ``XLA_FLAGS`` is left as it is.

The suite's processes also collect cyclic garbage less often than CPython's
default: tracing makes millions of short-lived objects while JAX's caches of
traced and compiled programs keep growing, and every full collection scans
all of them. Rarer full collections leave the peak memory as it was and save
most of the time the collector took (``benchmarks/RESULTS.md``, 2026-12-07).
"""

import gc
import os

# (gen-0 allocations, gen-0 runs per gen-1 run, gen-1 runs per full run);
# CPython's default is (700, 10, 10).
gc.set_threshold(10_000, 20, 20)

_FLAGS = {"--xla_force_host_platform_device_count": "8"}
if not os.environ.get("OSGD_TEST_OPTIMIZED_XLA"):
  _FLAGS.update(
    {
      "--xla_backend_optimization_level": "0",
      "--xla_llvm_disable_expensive_passes": "true",
      "--xla_cpu_use_fusion_emitters": "false",
      # XLA:CPU splits a module into parts compiled on threads; with one
      # xdist worker per core those threads only compete for the cores.
      "--xla_cpu_parallel_codegen_split_count": "1",
    }
  )
_current = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
  [_current]
  + [
    f"{flag}={value}" for flag, value in _FLAGS.items() if flag not in _current
  ]
).strip()
