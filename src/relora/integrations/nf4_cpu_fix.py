"""A fix for bitsandbytes 0.50's CPU NF4 dequantization, applied before the first NF4 layer is built.

Its own module because it patches someone else's kernel: nothing else of
``relora.integrations.quantize`` depends on how, only that it is applied.
"""

from __future__ import annotations

import ctypes
import math
import warnings
from types import ModuleType

import torch

_DONE = {"done": False}


def fix_cpu_nf4_dequantize(bnb: ModuleType) -> None:
    """Make bitsandbytes' CPU NF4 dequantization correct for weights whose rows are not whole blocks.

    bitsandbytes 0.50.2 quantizes in blocks of 64 consecutive weights of the flattened matrix, but its
    native CPU dequantization kernel assumes that blocks never straddle two rows: for a weight with
    ``in_features`` not a multiple of 64 (the 60m preset's down_proj has 1376) it returns wrong values
    (measured: errors of 3x the quantization error for a 64 x 96 weight) and every forward and merge on
    CPU uses them. The CUDA kernel works on the flat index and is right. The fix re-registers the CPU
    kernel to call the same native routine on whole blocks (a (numel / 64, 64) view, where its
    assumption holds) and reshape; anything else goes to bitsandbytes' generic implementation, the one
    its CPU kernel already falls back to for odd shapes.
    """
    if _DONE["done"]:
        return
    _DONE["done"] = True
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):  # no native library: the generic code runs anyway
        return
    native = {torch.float32: lib.cdequantize_blockwise_cpu_nf4_fp32,
              torch.bfloat16: lib.cdequantize_blockwise_cpu_nf4_bf16}
    ptr = bnb.functional.get_ptr

    def dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: list[int],
                        dtype: torch.dtype) -> torch.Tensor:
        A = A.view(torch.uint8) if A.dtype != torch.uint8 else A
        n = math.prod(shape)
        if quant_type != "nf4" or dtype not in native or n % blocksize or blocksize >= 2048:
            code = _get_4bit_code(quant_type, A.device)
            return _dequantize_4bit_compute.__wrapped__(A.reshape(-1), absmax, code, blocksize, shape, dtype)
        A, absmax = A.contiguous(), absmax.float().contiguous()
        out = torch.empty((n // blocksize, blocksize), dtype=dtype)
        native[dtype](ptr(A), ptr(absmax), ptr(out), ctypes.c_longlong(blocksize), ctypes.c_longlong(n // blocksize),
                      ctypes.c_longlong(blocksize))
        return out.reshape(shape)

    with warnings.catch_warnings():  # torch warns that a kernel is overridden: that is the point
        warnings.simplefilter("ignore", UserWarning)
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)
