"""Integer packing into int32 words."""
import pytest
import torch

from mmdet_regptq.quant import pack_int, packed_numel, unpack_int, values_per_word


@pytest.mark.parametrize('bits', range(2, 9))
@pytest.mark.parametrize('signed', [True, False])
def test_round_trip(bits, signed):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    values = torch.randint(lo, hi + 1, (3, 5, 7), generator=torch.Generator().manual_seed(bits))
    values[0, 0, 0], values[0, 0, 1] = lo, hi                  # both ends
    words = pack_int(values, bits, signed=signed)
    assert words.dtype == torch.int32
    assert words.numel() == packed_numel(values.numel(), bits)
    assert torch.equal(unpack_int(words, bits, values.shape, signed=signed), values.int())


def test_layout_matches_hawq_4bit():
    assert values_per_word(4) == 8 and values_per_word(3) == 10 and values_per_word(8) == 4
    words = pack_int(torch.arange(1, 9), 4, signed=False)
    assert words.tolist() == [0x87654321 - 2 ** 32]            # first value in the low bits


def test_errors():
    with pytest.raises(ValueError, match='bits'):
        pack_int(torch.zeros(4, dtype=torch.int32), 9, signed=False)
    with pytest.raises(ValueError, match=r'\[0, 15\]'):
        pack_int(torch.tensor([16]), 4, signed=False)
    with pytest.raises(ValueError, match='integer'):
        pack_int(torch.zeros(4), 4, signed=False)
    with pytest.raises(ValueError, match='words'):
        unpack_int(torch.zeros(2, dtype=torch.int32), 4, 17, signed=False)
