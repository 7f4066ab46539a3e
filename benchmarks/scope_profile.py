"""Which share of a compiled step's kernel time a named scope takes.

A difference of two wall-clock times (the step with and without a part) is
too noisy to resolve a part worth a few percent on a shared machine. A
profile is not: JAX's profiler records every kernel that XLA runs, under the
name of its instruction in the compiled program, and the program records,
for every operation, the ``jax.named_scope`` it was traced in. Summing the
kernels of a scope over many runs of the step gives its share directly.

XLA fuses operations into kernels, and a kernel may hold operations from the
scope and from outside it (on XLA:CPU, ``osgd``'s weighted sum fuses into
the optimizer's per-parameter update). Each kernel is therefore put in one
of three classes, by the scopes of the operations it contains:

* ``scope``: only operations of the scope (a lower bound of its time);
* ``mixed``: operations of the scope and others (``scope + mixed`` is an
  upper bound: it counts the others' work too);
* ``other``: none of the scope.

Control-flow instructions (``while``, ``conditional``, ``call``) are not
kernels; their bodies' kernels are counted instead.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax

__all__ = ["ScopeShare", "classify_kernels", "profile_scopes"]

_CONTROL_FLOW = ("while", "conditional", "call")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = \S+(?: \S+)*? ([\w-]+)\(")
_CALLEES = re.compile(
  r"(?:calls|body|condition|to_apply|branch_computations)"
  r"=\{?%([\w.\-]+)"
)
_OP_NAME = re.compile(r'op_name="([^"]*)"')


class ScopeShare(NamedTuple):
  """Kernel time of one compiled function, per run, split by a scope.

  Attributes:
    runs: profiled runs of the function.
    kernels: kernels per run (all classes).
    total_s: mean over runs of the summed kernel time.
    scope_s: mean over runs of the time of the scope's own kernels.
    mixed_s: mean over runs of the time of kernels that mix the scope's
      operations with others.
    scope_kernels: kernels per run of the scope's own.
    mixed_kernels: mixed kernels per run.
  """

  runs: int
  kernels: float
  total_s: float
  scope_s: float
  mixed_s: float
  scope_kernels: float
  mixed_kernels: float

  @property
  def share(self) -> float:
    """The scope's own kernels over all kernel time (a lower bound)."""
    return self.scope_s / self.total_s

  @property
  def upper_share(self) -> float:
    """The scope's and the mixed kernels over all kernel time."""
    return (self.scope_s + self.mixed_s) / self.total_s


def _parse(hlo_text: str) -> tuple[dict[str, list[str]], dict[str, str]]:
  """Computations (name → instruction lines) and instruction name → line."""
  computations: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(1)
      computations[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None:
      computations[current].append(line)
  instructions = {}
  for lines in computations.values():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if match:
        instructions[match.group(1)] = line
  return computations, instructions


def classify_kernels(hlo_text: str, scope: str) -> dict[str, str]:
  """Classes (``scope``/``mixed``/``other``/``control``) of every instruction.

  Args:
    hlo_text: the compiled program, ``compiled.as_text()``.
    scope: a ``jax.named_scope`` name.

  Returns:
    Instruction name → class; ``control`` for control flow, whose kernels
    are listed under their own names.
  """
  computations, instructions = _parse(hlo_text)

  def op_names(line: str, seen: set[str]) -> set[str]:
    names = set(_OP_NAME.findall(line))
    for callee in _CALLEES.findall(line):
      if callee not in seen:
        seen.add(callee)
        for inner in computations.get(callee, ()):
          names |= op_names(inner, seen)
    return names

  marker = re.compile(rf"(^|/){re.escape(scope)}(/|$)")
  classes = {}
  for name, line in instructions.items():
    opcode = _INSTRUCTION.match(line).group(2)
    if opcode in _CONTROL_FLOW:
      classes[name] = "control"
      continue
    inside = [bool(marker.search(n)) for n in op_names(line, set())]
    if inside and all(inside):
      classes[name] = "scope"
    elif any(inside):
      classes[name] = "mixed"
    else:
      classes[name] = "other"
  return classes


def _trace_kernels(
  call: Callable[[], object], module: str, runs: int
) -> list[list[tuple[str, float]]]:
  """Profiles ``runs`` calls: per run, (instruction, seconds) of each kernel."""
  call()  # warm
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      for _ in range(runs):
        call()
    paths = glob.glob(
      os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True
    )
    if not paths:
      raise RuntimeError(f"the profiler wrote no trace under {log_dir}")
    with gzip.open(paths[0]) as f:
      events = json.load(f)["traceEvents"]
  per_run = collections.defaultdict(list)
  for event in events:
    args = event.get("args") or {}
    if (
      event.get("ph") == "X"
      and args.get("hlo_module") == module
      and "hlo_op" in args
    ):
      per_run[args.get("run_id")].append((args["hlo_op"], event["dur"] * 1e-6))
  if not per_run:
    raise RuntimeError(
      f"the profile has no kernel of {module}; this backend's profiler"
      " does not record kernels by instruction"
    )
  return list(per_run.values())


def profile_scopes(
  call: Callable[[], object],
  hlo_text: str,
  scopes: Sequence[str],
  runs: int = 50,
) -> dict[str, ScopeShare]:
  """Profiles ``runs`` calls and splits the kernel time by each scope.

  Args:
    call: runs the compiled function once and waits for its result.
    hlo_text: that function's compiled program, ``compiled.as_text()``.
    scopes: the ``jax.named_scope`` names to measure (each on its own).
    runs: calls to profile.

  Returns:
    A :class:`ScopeShare` per scope, all from the same profile.

  Raises:
    RuntimeError: the profile holds no kernel of the program (a backend
      whose profiler does not record kernels).
  """
  module = re.match(r"HloModule (\S+?),", hlo_text).group(1)
  runs_seen = _trace_kernels(call, module, runs)
  shares = {}
  for scope in scopes:
    classes = classify_kernels(hlo_text, scope)
    totals = []
    for kernels in runs_seen:
      counts = collections.Counter()
      for name, seconds in kernels:
        kind = classes.get(name, "other")
        if kind != "control":
          counts[kind] += seconds
          counts[kind + "#"] += 1
      totals.append(counts)

    # Means, not medians: the parts then add up to the total exactly.
    def mean(key, totals=totals):
      return statistics.mean(t[key] for t in totals)

    shares[scope] = ScopeShare(
      runs=len(totals),
      kernels=mean("scope#") + mean("mixed#") + mean("other#"),
      total_s=mean("scope") + mean("mixed") + mean("other"),
      scope_s=mean("scope"),
      mixed_s=mean("mixed"),
      scope_kernels=mean("scope#"),
      mixed_kernels=mean("mixed#"),
    )
  return shares
