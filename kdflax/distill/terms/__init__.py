"""The registered loss terms, in the order they are configured, computed and summed.

To add a term: write `kdflax/distill/terms/<name>.py` with a `LossTerm` subclass
(`kdflax.distill.term`) and add it to `TERMS` below; its `defaults` become
`config.loss.<name>` and the objective computes it when its weight is nonzero.
"""

from kdflax.distill.terms.attention import AttentionTransfer
from kdflax.distill.terms.ce import CrossEntropy
from kdflax.distill.terms.dkd import DecoupledKD
from kdflax.distill.terms.hard import HardKD
from kdflax.distill.terms.kd import LogitKD
from kdflax.distill.terms.manifold import ManifoldRelations

TERMS = (CrossEntropy, LogitKD, DecoupledKD, HardKD, AttentionTransfer, ManifoldRelations)
