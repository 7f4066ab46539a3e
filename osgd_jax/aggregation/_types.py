"""The types that aggregators' signatures share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax

#: A weighting: a jittable function from a ``(K, K)`` Gram matrix to ``(K,)``
#: weights.
Weighting = Callable[[jax.Array], jax.Array]

#: Where Gram matrices and weights are formed: one per parameter tensor
#: (``"leaf"``), or one over all parameters (``"global"``).
Granularity = Literal["leaf", "global"]
