"""cuflash: exact FlashAttention for any DLPack array, JIT-compiled at first use, nothing to build.

    >>> import cuflash
    >>> out = cuflash.attention(q, k, v, causal=True)

See :func:`cuflash.attention`; :func:`cuflash.plan` checks and compiles a repeated problem once.
``import cuflash`` imports neither PyTorch nor JAX.
"""

from .api import attention, attention_backward
from .attention_plan import AttentionPlan, plan
from .dropout import dropout_mask
from .block_mask import BlockMask
from .varlen import attention_varlen, attention_varlen_backward
from .kvcache import attention_with_kvcache, merge_attention_states, merge_attention_states_list
from .jit import precompile

__version__ = "0.1.0"


def gpu_available() -> bool:
    """True when CuPy is importable and sees a CUDA GPU of compute capability 8.0 or newer."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        return int(cupy.cuda.Device(0).compute_capability) >= 80
    except Exception:
        return False


__all__ = ["attention", "attention_backward", "plan", "AttentionPlan", "dropout_mask", "BlockMask", "attention_varlen", "attention_varlen_backward",
           "attention_with_kvcache", "merge_attention_states", "merge_attention_states_list", "precompile",
           "gpu_available", "__version__"]
