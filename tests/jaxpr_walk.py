"""What a jaxpr's output is computed from: structural checks on programs.

A test that must show two values are computed independently (so that XLA
can produce and free them one at a time) walks the jaxpr back from one
output and checks which inputs it reaches.
"""

from __future__ import annotations

from typing import Any

from jax.extend import core as jex_core


def inputs_reached(jaxpr: Any, outvar: Any) -> set[int]:
  """The indices of ``jaxpr``'s inputs that ``outvar`` is computed from."""
  needed, producers = {outvar}, {}
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      producers[v] = eqn
  stack = [outvar]
  while stack:
    eqn = producers.get(stack.pop())
    for v in eqn.invars if eqn is not None else ():
      if not isinstance(v, jex_core.Literal) and v not in needed:
        needed.add(v)
        stack.append(v)
  return {i for i, v in enumerate(jaxpr.invars) if v in needed}
