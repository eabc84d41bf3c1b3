"""`ce`: cross-entropy of the student against the labels (or mixup/CutMix soft labels)."""

from __future__ import annotations

from kdflax.distill import losses
from kdflax.distill.term import Array, Inputs, LossTerm, fraction


class CrossEntropy(LossTerm):
  """`weight * CE(student, labels)` with label smoothing `eps`: targets (1 - eps) onehot +
  eps / K. `logits`: 'logits' (what the model returns) or a student `(B, K)` intermediate,
  e.g. 'cls_logits'."""

  name = 'ce'
  defaults = {'weight': 1.0, 'label_smoothing': 0.0, 'logits': 'logits'}

  @classmethod
  def check(cls, section):
    fraction('ce.label_smoothing', section['label_smoothing'])

  def __init__(self, section, context):
    super().__init__(section, context)
    context.check_logits_key('ce.logits', section['logits'])

  def __call__(self, x: Inputs) -> dict[str, Array]:
    targets = x.labels if x.soft_labels is None else x.soft_labels
    return {'ce': self.weight * losses.cross_entropy(
        x.student(self.section['logits']), targets, self.section['label_smoothing'], x.mask)}
