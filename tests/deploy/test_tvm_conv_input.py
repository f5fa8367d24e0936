"""The input pack both int8 convolution kernels share (``tvm/conv_input.py``): the padded,
four-channel-interleaved uint8 layout equals a NumPy pad + reshape, for int8 codes (+128)
and uint8 codes with a zero point, odd channel counts and uneven pads."""
from __future__ import annotations

import numpy as np
import pytest


def _numpy_pack(x, pads, input_dtype, pad_code):
    n, c, h, w = x.shape
    shift, pad = (128, 128) if input_dtype == 'int8' else (0, pad_code)
    quads = -(-c // 4)
    padded = np.full((n, quads * 4, h + pads[0] + pads[2], w + pads[1] + pads[3]), pad,
                     np.int32)
    padded[:, :c, pads[0]:pads[0] + h, pads[1]:pads[1] + w] = x.astype(np.int32) + shift
    blocked = padded.reshape(n, quads, 4, *padded.shape[2:]).transpose(0, 1, 3, 4, 2)
    return blocked.reshape(n * quads, *padded.shape[2:], 4).astype(np.uint8)


@pytest.mark.parametrize('shape,pads,input_dtype,pad_code', [
    ((1, 8, 5, 7), (1, 1, 1, 1), 'int8', 0),
    ((2, 6, 4, 3), (0, 2, 1, 0), 'int8', 0),
    ((1, 5, 3, 6), (2, 0, 0, 1), 'uint8', 37),
])
def test_pack_equals_numpy_pad_and_interleave(shape, pads, input_dtype, pad_code):
    import tvm
    from tvm.script import tirx as T

    from mmdet_regptq.deploy.tvm.conv_input import conv_geometry, input_pack

    n, c, h, w = shape
    geo = conv_geometry(c, h, w, 3, 3, pads, (1, 1), (1, 1))
    pack = input_pack(n, c, h, w, pads, input_dtype, pad_code, 'pack')
    rows, hp, wp = n * geo.quads, geo.padded_h, geo.padded_w

    @T.prim_func(s_tir=True)
    def main(x: T.Buffer((n, c, h, w), input_dtype), data: T.Buffer((rows, hp, wp, 4), 'uint8')):
        T.func_attr({'tirx.noalias': True})
        pack(x, data)

    lib = tvm.compile(tvm.IRModule({'main': main}), target='llvm')
    rng = np.random.default_rng(0)
    low, high = (-128, 128) if input_dtype == 'int8' else (0, 256)
    x = rng.integers(low, high, shape).astype(input_dtype)
    data = tvm.runtime.tensor(np.zeros((rows, hp, wp, 4), np.uint8))
    lib['main'](tvm.runtime.tensor(x), data)
    np.testing.assert_array_equal(data.numpy(), _numpy_pack(x, pads, input_dtype, pad_code))


def test_geometry_and_bad_dtype():
    from mmdet_regptq.deploy.tvm.conv_input import conv_geometry, input_pack

    assert conv_geometry(5, 17, 13, 3, 3, (1, 1, 1, 1), (2, 2), (1, 1)) == (2, 19, 15, 9, 7)
    assert conv_geometry(16, 12, 12, 3, 3, (2, 2, 2, 2), (1, 1), (2, 2)).out_w == 12
    with pytest.raises(ValueError, match="input_dtype='float32': expected 'int8' or 'uint8'"):
        input_pack(1, 4, 4, 4, (0, 0, 0, 0), 'float32', 0, 'pack')
