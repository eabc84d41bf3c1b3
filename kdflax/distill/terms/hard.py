"""`hard`: DeiT hard distillation, cross-entropy against the teacher's arg-max."""

from __future__ import annotations

from kdflax.distill import losses
from kdflax.distill.term import Array, Inputs, LossTerm, fraction


class HardKD(LossTerm):
  """`CE(student, argmax teacher)`; with `distillation_token`, DeiT's
  `0.5 CE(cls_logits, labels) + 0.5 CE(dist_logits, argmax teacher)` reading the student
  intermediates 'cls_logits' and 'dist_logits' (set ce.weight to 0 then), the label half
  smoothed by `label_smoothing`."""

  name = 'hard'
  defaults = {'weight': 0.0, 'logits': 'logits', 'distillation_token': False,
              'label_smoothing': 0.0}
  uses_teacher_logits = True

  @classmethod
  def check(cls, section):
    fraction('hard.label_smoothing', section['label_smoothing'])

  def __init__(self, section, context):
    super().__init__(section, context)
    if section['distillation_token']:
      for key in ('cls_logits', 'dist_logits'):
        context.check_logits_key('hard.distillation_token', key)
    else:
      context.check_logits_key('hard.logits', section['logits'])

  def __call__(self, x: Inputs) -> dict[str, Array]:
    h = self.section
    if h['distillation_token']:
      value = losses.deit_distillation_loss(
          x.student('cls_logits'), x.student('dist_logits'), x.teacher_logits, x.labels,
          h['label_smoothing'], x.mask)
    else:
      value = losses.hard_distillation_loss(x.student(h['logits']), x.teacher_logits, x.mask)
    return {'hard': self.weight * value}
