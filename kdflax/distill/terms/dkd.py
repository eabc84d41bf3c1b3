"""`dkd`: decoupled KD, `warmup * T^2 (alpha TCKD + beta NCKD)`."""

from __future__ import annotations

from kdflax.distill import losses
from kdflax.distill.term import Array, Inputs, LossTerm, count, number


class DecoupledKD(LossTerm):
  """Target-class (`alpha`) and non-target-class (`beta`) parts at temperature `T`, scaled by
  `min(step / warmup_steps, 1)` (needs `step=` in `apply` when `warmup_steps > 0`)."""

  name = 'dkd'
  defaults = {'weight': 0.0, 'alpha': 1.0, 'beta': 8.0, 'temperature': 4.0, 'warmup_steps': 0,
              'logits': 'logits'}
  uses_teacher_logits = True

  @classmethod
  def check(cls, section):
    number('dkd.temperature', section['temperature'], 0.0, strict=True)
    number('dkd.alpha', section['alpha'], 0.0)
    number('dkd.beta', section['beta'], 0.0)
    count('dkd.warmup_steps', section['warmup_steps'], 0)

  def __init__(self, section, context):
    super().__init__(section, context)
    context.check_logits_key('dkd.logits', section['logits'])

  def __call__(self, x: Inputs) -> dict[str, Array]:
    d = self.section
    if d['warmup_steps'] and x.step is None:
      raise ValueError('dkd.warmup_steps > 0 needs the training step: apply(..., step=step)')
    return {'dkd': self.weight * losses.dkd_loss(
        x.student(d['logits']), x.teacher_logits, x.labels, d['alpha'], d['beta'],
        d['temperature'], x.step, d['warmup_steps'], x.mask)}
