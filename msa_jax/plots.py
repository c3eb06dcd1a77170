"""Figures of benchmarks, sweeps and runs: matplotlib off-screen, one way to save."""
from __future__ import annotations


def subplots(*args, **kwargs):
  """``matplotlib.pyplot.subplots`` on the off-screen Agg backend (no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt.subplots(*args, **kwargs)


def save(fig, path: str, dpi: int = 120) -> str:
  """Lays ``fig`` out, writes it to ``path`` (PNG by its suffix) and closes it."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path
