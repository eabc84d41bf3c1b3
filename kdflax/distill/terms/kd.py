"""`kd`: Hinton's logit distillation, `T^2 KL(softmax(t / T) || softmax(s / T))`."""

from __future__ import annotations

from kdflax.distill import losses
from kdflax.distill.term import Array, Inputs, LossTerm, number


class LogitKD(LossTerm):
  """Batch mean of the tempered KL; `logits` e.g. 'dist_logits' for DeiT soft distillation."""

  name = 'kd'
  defaults = {'weight': 0.0, 'temperature': 4.0, 'logits': 'logits'}
  uses_teacher_logits = True

  @classmethod
  def check(cls, section):
    number('kd.temperature', section['temperature'], 0.0, strict=True)

  def __init__(self, section, context):
    super().__init__(section, context)
    context.check_logits_key('kd.logits', section['logits'])

  def __call__(self, x: Inputs) -> dict[str, Array]:
    return {'kd': self.weight * losses.kd_loss(
        x.student(self.section['logits']), x.teacher_logits, self.section['temperature'],
        x.mask)}
