"""Fixtures of the deployment tests."""
from __future__ import annotations

import pytest

from deploy_toy import make_quantized


@pytest.fixture(scope='session')
def w4a4(tmp_path_factory, single_thread):
    """W4A4 TinyNet (first layer 8 bit) exported with INT4 weights."""
    from mmdet_regptq.deploy import export_onnx

    model, x = make_quantized(dict(w_bits=4, a_bits=4))
    path = tmp_path_factory.mktemp('w4a4') / 'tiny.onnx'
    report = export_onnx(model, x, path, output_names=['feat', 'logits'])
    return model, x, path, report
