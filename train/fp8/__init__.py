"""FP8 mixed precision, DeepSeek-V3's fine-grained recipe: `linear.py` converts a model's
linear layers and expert GEMMs (and switches them off for evaluation), `quant.py` holds
the E4M3 tile/block quantisation and the two GEMM backends (emulate, scaled_mm)."""

from train.fp8.linear import Fp8Linear, Fp8Report, _Fp8GroupedLinear, convert_to_fp8, fp8_disabled
from train.fp8.quant import (
    BACKENDS,
    E4M3_MAX,
    TILE,
    dequantize_blocks,
    dequantize_tiles,
    fp8_matmul_nt,
    quantize_blocks,
    quantize_tiles,
    sqnr_db,
)

__all__ = ["BACKENDS", "E4M3_MAX", "TILE", "Fp8Linear", "Fp8Report", "_Fp8GroupedLinear", "convert_to_fp8",
           "dequantize_blocks", "dequantize_tiles", "fp8_disabled", "fp8_matmul_nt", "quantize_blocks",
           "quantize_tiles", "sqnr_db"]
