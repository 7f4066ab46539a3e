"""A stdout whose reader goes away, as ``cmd | head`` closes a pipe."""

from __future__ import annotations

import io


class ReaderGoneAfter(io.StringIO):
  """Takes ``lines`` lines, then raises ``BrokenPipeError`` on every write.

  Args:
    lines: how many lines the reader reads before it leaves.
  """

  def __init__(self, lines: int):
    super().__init__()
    self.lines = lines

  def write(self, text: str) -> int:
    if self.getvalue().count("\n") >= self.lines:
      raise BrokenPipeError(32, "Broken pipe")
    return super().write(text)
