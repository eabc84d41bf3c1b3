"""Shared pytest set-up: quiet TensorFlow, CPU-only JAX, repository paths."""

import os
import pathlib
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Never reach for the network (TFDS, Hugging Face hub) from a test.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('NO_GCE_CHECK', 'true')

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = ROOT / 'tests'
if str(TESTS) not in sys.path:
  sys.path.insert(0, str(TESTS))
