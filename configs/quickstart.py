"""Quick start: distil an ImageNet-pretrained teacher into the phone model, and export it, on
real bean-leaf photos in under 10 minutes on 2 CPU cores.

    kdflax pipeline --config configs/quickstart.py --workdir runs/quickstart     # make demo

Data: `data/beans_small`, the whole iBean train (1,034) and val (133) splits at 128 px.
Student: MobileNetV3-Small 0.5 at 64 px, the phone model, trained from scratch twice: alone
(the baseline, on the labels) and distilled: from the teacher's outputs on the same crops
alone (KL at T = 1, no labels: function matching).
Teacher: EfficientNet-Lite0 fine-tuned at 128 px from its ImageNet weights
(`configs/beans_pretrained.py`: 5 epochs from `pretrained:efficientnet_lite0`; 97.7% val
top-1). Its outputs come from `results/beans/teacher_cache/` (736 KB, committed): its logits
on 60 fixed augmented crops of every train photo, the crops the student sees over its 60
epochs (`kdflax cache-teacher`, docs/teacher_cache.md). Running the teacher on those crops
takes longer than the rest of the demo on 2 cores; the cache is how the demo fits in
10 minutes. The cache is stamped with the teacher's weights, the data, the resolutions and
the seed, and a run that changes any of them is refused in one line.

    --config.teacher.cache=''            fine-tune the teacher here and distil from it live
                                         (about 20 minutes on 2 cores)
    --config.teacher.checkpoint=DIR      distil live from a teacher model directory you have

This is the `kd` row of `configs/beans_pretrained.py`, the recipe of `results/beans/` (every
method x 3 seeds, docs/results.md); the demo's numbers are its seed 0. The Swin ->
MobileNetV3 recipe for converted timm Swin weights is `configs/beans_*.py` and
`configs/plantvillage_tomato_swin_l_mnv3.py`.
"""

import os

from configs import beans_pretrained

CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'results',
                     'beans', 'teacher_cache')


def get_config():
  config = beans_pretrained.get_config()
  config.loss.attention.weight = 0.0   # logit KD only (the matrix's `kd` row)
  config.teacher.cache = CACHE
  return config
