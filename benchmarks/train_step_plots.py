"""The plots of ``benchmarks/train_step.py``: MFU and memory against batch, compile time
against depth (PNG beside each JSON)."""
from __future__ import annotations


def batches(rows, path: str) -> None:
  """MFU (vendor peak) and step memory vs batch size, one line per variant x memory."""
  from msa_jax import plots
  fig, (ax_mfu, ax_mem) = plots.subplots(1, 2, figsize=(10, 4))
  timed = [r for r in rows if r.get("fits") and "mfu_vendor" in r]   # not compile-only rows
  keys = sorted({(r["variant"], r["memory_tokens"], r["scan_layers"]) for r in timed})
  for variant, memory, scan in keys:
    pts = [r for r in timed
           if (r["variant"], r["memory_tokens"], r["scan_layers"]) == (variant, memory, scan)]
    label = f"{variant}, {memory // 1024}K memory, scan {'on' if scan else 'off'}"
    ax_mfu.plot([r["batch"] for r in pts], [100 * r["mfu_vendor"] for r in pts], "o-", label=label)
    ax_mem.plot([r["batch"] for r in pts], [r["needs_gib"] for r in pts], "o-", label=label)
  ax_mfu.set(xlabel="batch", ylabel="MFU (% of vendor bf16 peak)", title="training step MFU")
  ax_mem.set(xlabel="batch", ylabel="GiB (memory_analysis)", title="step memory")
  ax_mfu.legend()
  plots.save(fig, path)


def compile_layers(rows, path: str) -> None:
  """Compile seconds vs depth: the step and the loss gradient alone, unrolled and scanned."""
  from msa_jax import plots
  fig, ax = plots.subplots(figsize=(6, 4))
  for scan, style in ((False, "o-"), (True, "s--")):
    pts = sorted((r for r in rows if r["scan_layers"] == scan), key=lambda r: r["num_layers"])
    name = "scanned" if scan else "unrolled"
    for key, label in (("compile_s", "step (compile)"),
                       ("grad_only_compile_s", "loss gradient alone (trace+compile)")):
      if pts and key in pts[0]:
        ax.plot([r["num_layers"] for r in pts], [r[key] for r in pts], style,
                label=f"{label}, {name}")
  ax.set(xlabel="layers", ylabel="compile seconds", title="training step compile time vs depth")
  ax.legend()
  plots.save(fig, path)
