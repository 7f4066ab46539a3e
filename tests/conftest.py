"""Gives the whole test session 8 CPU devices, for the multi-device tests.

XLA reads ``XLA_FLAGS`` once, when the first JAX backend starts, so the flag
must be set here, before any test module touches a device. Single-device code
runs on device 0 as before; ``tests/test_sharding.py`` builds meshes over all
eight. An ``XLA_FLAGS`` already forcing a device count is left alone.
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()
