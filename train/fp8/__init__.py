"""FP8 mixed precision (DeepSeek-V3's fine-grained recipe): `linear.py` converts layers, `quant.py` quantises."""

from train.fp8.linear import Fp8Linear, _Fp8GroupedLinear, convert_to_fp8, fp8_disabled  # noqa: F401
from train.fp8.quant import dequantize_blocks, dequantize_tiles, quantize_blocks, quantize_tiles, sqnr_db  # noqa: F401
