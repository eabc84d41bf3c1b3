"""MobileNetV3-Large student: TFLite export at fp32, fp16 and int8 (checks in helpers)."""

import pytest
from helpers.export_mnv3_cases import *  # noqa: F403 - the shared tests and fixtures


@pytest.fixture(scope='module')
def model_name():
  return 'mobilenetv3_large_100'
