"""Smoke-scale ablation: top-k and document-wise vs global RoPE (a few CPU minutes a run)."""


def get_sweep(arg: str = ""):
  del arg
  return {
      "name": "smoke_topk_rope",
      "config": "configs/16k_to_100m.py:smoke",
      "grid": {"model.top_k": [1, 2, 4], "model.rope_mode": ["document", "global"]},
  }
