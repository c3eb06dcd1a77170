"""Run two pieces of start-up work at once: a state made (drawn, loaded or restored) in
another thread while this thread compiles. XLA compiles and file reads release the GIL, so
a run waits for the longer of the two, not their sum."""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable

import jax


def beside(make_state: Callable[[], Any], work: Callable[[], Any]):
  """``(make_state(), work())``: the state made in another thread while ``work`` (e.g. a
  step's compile) runs here. Returns once both have finished (nothing is left running past
  this call); ``work``'s error wins if both fail, else the state's error is raised."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    pending = pool.submit(lambda: jax.block_until_ready(make_state()))
    out = work()     # on an error, leaving the block waits for the state
    return pending.result(), out
