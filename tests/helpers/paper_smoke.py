"""The paper's configuration shrunk for CPU tests: only depth, width and run length change.

Same code paths as the real run: Swin-L at 384 px with window 12 (stage grids 96/48/24/12),
MobileNetV3-Large at 224 px, the tomato filter of TFDS `plant_village`, the attention pairs
Swin-L stage i -> MobileNetV3-L stage i, bfloat16 compute, RandAugment, EMA, int8 export.
"""

CONFIG = 'configs/plantvillage_tomato_swin_l_mnv3.py'
# On top of `colab_tpu.py:...` too: those flags replace its batch sizes as well.
SHRINK = (
    # Swin-L's depth (2, 2, 18, 2) and width (192 channels, heads 6..48) -> 2 blocks a stage
    # (shifted windows kept), 16 channels, one head; image size and window unchanged.
    '--config.teacher.overrides.embed_dim=16',
    '--config.teacher.overrides.depths=(2, 2, 2, 2)',
    '--config.teacher.overrides.num_heads=(1, 1, 1, 1)',
    '--config.model.overrides.width_mult=0.25',
    # The depthwise form a TPU or GPU gets from 'auto' (the CPU's shifted-slices form is
    # tested in depthwise_test.py; it compiles slower).
    "--config.model.overrides.depthwise='conv'",
    '--config.data.batch_size=8',
    '--config.data.eval_batch_size=8',
    '--config.data.threads=1',
    '--config.teacher.train.num_steps=2',
    '--config.teacher.train.progress=False',
    '--config.train.num_steps=2',
    '--config.train.progress=False',
    '--config.export.calibration_images=8',
    '--config.export.eval_images=8',
)
# Examples of the mocked TFDS `plant_village` (38 classes, about a quarter of them tomato).
MOCK_EXAMPLES = 200
