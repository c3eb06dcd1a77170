"""Two-phase schedule (SPEC §4, paper §3.3) and the AdamW optimizer.

Phase 1, router warm-up (``step < warmup_phase_steps``): ``L = 0.1·L_LM + L_aux``
at ``warmup_phase_lr`` (1e-4) after a short linear ramp. Phase 2, main:
``L = L_LM + 0.1·L_aux`` with the learning rate annealed (cosine) from
``main_phase_lr`` to ``final_lr`` (6e-6) at ``num_steps``. ``optim.decay_steps`` > 0
holds the main phase's lr at ``main_phase_lr`` and anneals (cosine) only over the last
``decay_steps`` steps (warmup-stable-decay): a short run then keeps its peak lr as long as a
long run's cosine would.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax


def main_phase_steps(cfg) -> int:
  """Steps of the main phase's schedule: after the warm-up phase, or after the lr ramp
  when there is no warm-up phase."""
  o = cfg.optim
  warm = int(o.warmup_phase_steps)
  ramp = 0 if warm else max(1, int(o.lr_ramp_steps))
  return max(1, int(cfg.num_steps) - warm - ramp)


def _anneal(o, steps: int) -> optax.Schedule:
  """``main_phase_lr`` → ``final_lr`` over ``steps``: cosine throughout, or held and then
  cosine over the last ``optim.decay_steps``."""
  alpha = o.final_lr / max(o.main_phase_lr, 1e-30)
  decay = int(o.get("decay_steps", 0))
  if decay <= 0:
    return optax.cosine_decay_schedule(o.main_phase_lr, steps, alpha=alpha)
  return optax.join_schedules(
      [optax.constant_schedule(o.main_phase_lr),
       optax.cosine_decay_schedule(o.main_phase_lr, decay, alpha=alpha)], [steps - decay])


def learning_rate_schedule(cfg) -> optax.Schedule:
  """The learning rate at each step for the two-phase recipe in ``cfg.optim``."""
  o = cfg.optim
  warm = int(o.warmup_phase_steps)
  ramp = max(1, min(int(o.lr_ramp_steps), warm) if warm else int(o.lr_ramp_steps))
  anneal = _anneal(o, main_phase_steps(cfg))
  if warm:
    phase1 = optax.join_schedules(
        [optax.linear_schedule(0.0, o.warmup_phase_lr, ramp), optax.constant_schedule(o.warmup_phase_lr)],
        [ramp])
    return optax.join_schedules([phase1, anneal], [warm])
  return optax.join_schedules([optax.linear_schedule(0.0, o.main_phase_lr, ramp), anneal], [ramp])


def loss_weights(cfg, step):
  """``(lm_weight, aux_weight)`` at ``step`` (traced or Python int)."""
  o = cfg.optim
  in_warmup = jnp.asarray(step) < int(o.warmup_phase_steps)
  lm_w = jnp.where(in_warmup, o.warmup_lm_weight, o.main_lm_weight)
  aux_w = jnp.where(in_warmup, o.warmup_aux_weight, o.main_aux_weight)
  return lm_w.astype(jnp.float32), aux_w.astype(jnp.float32)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW with global-norm clipping on the two-phase learning rate.

  ``optim.mu_dtype`` ("" = the parameters' dtype) stores Adam's first moment in another
  dtype: "bfloat16" saves 2 bytes a parameter (8 GB at 4b with float32 parameters); the
  second moment stays in the parameters' dtype.
  """
  o = cfg.optim
  mu_dtype = o.get("mu_dtype", "") or None
  if mu_dtype is not None and mu_dtype not in ("bfloat16", "float32"):
    raise ValueError(f"optim.mu_dtype must be '', 'bfloat16' or 'float32', got {mu_dtype!r}")
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip_norm),
      optax.adamw(learning_rate_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps,
                  weight_decay=o.weight_decay, mu_dtype=mu_dtype),
  )
