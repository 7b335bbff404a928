"""Hugging Face transformers: cuflash as an attention implementation (``attn_implementation="cf_attention"``).

    >>> import cuflash.integrations.transformers as cf_hf
    >>> name = cf_hf.register()                            # once per process: "cf_attention"
    >>> model = AutoModelForCausalLM.from_config(config, attn_implementation=name)

:func:`register` adds :func:`attention_forward` to ``transformers.AttentionInterface`` and, under the same
name, FlashAttention-2's mask function to ``AttentionMaskInterface``: models then build no dense mask at all
(``None`` when nothing is padded, the 2-D padding mask otherwise), exactly as with
``attn_implementation="flash_attention_2"``. Training and inference through ``model(...)`` and
``generate`` without padding work; what needs variable-length attention (padded batches, packed
sequences) raises NotImplementedError until cuflash has it.
"""

from __future__ import annotations

import torch

from .. import torch as cf_torch

# Not "cuflash": transformers takes any implementation whose name contains "flash" for a FlashAttention kernel
# package and tries to import one (transformers 5.x, utils.generic.is_flash_attention_requested).
_NAME = "cf_attention"


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None, is_causal: bool | None = None,
                      s_aux: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention of one transformers layer, in the signature ``AttentionInterface`` calls.

    Parameters
    ----------
    module : torch.nn.Module
        The attention layer; ``module.is_causal`` is used when ``is_causal`` is None.
    query : Tensor, shape (batch, heads_q, seqlen_q, head_dim)
    key, value : Tensor, shape (batch, heads_k, seqlen_k, head_dim)
        transformers' layout; read in place through transposed views (no copy). ``heads_q`` a multiple of
        ``heads_k`` (GQA).
    attention_mask : Tensor or None
        What the registered mask function built: None when no token is padded. A padding mask (2-D) or a
        custom 4-D mask raises NotImplementedError (variable-length attention is not implemented yet).
    dropout : float
        Attention dropout; only 0.0 is supported (NotImplementedError otherwise).
    scaling : float, optional
        Softmax scale; default ``head_dim ** -0.5``.
    sliding_window : int, optional
        A query attends to at most ``sliding_window`` keys back: ``window_size = (sliding_window - 1,
        sliding_window - 1)`` as transformers' FlashAttention-2 path passes it (causal bounds the right).
    softcap : float, optional
        Logit softcapping (Gemma 2): ``softcap * tanh(score / softcap)``.

    Returns
    -------
    (out, None)
        ``out`` of shape (batch, seqlen_q, heads_q, head_dim), the layout transformers expects back, and no
        attention weights.

    Raises
    ------
    NotImplementedError
        A padding or custom mask, ``dropout > 0``, attention sinks (``s_aux``), or a value head dim that
        differs from the query's.
    """
    if attention_mask is not None:
        raise NotImplementedError(
            "cuflash attention got an attention mask (padded or packed sequences): that needs variable-length "
            "attention, which cuflash does not implement yet; pass batches without padding")
    if s_aux is not None:
        raise NotImplementedError("cuflash attention has no attention sinks (s_aux)")
    if value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(f"cuflash attention needs the value head dim ({value.shape[-1]}) to equal the "
                                  f"query head dim ({query.shape[-1]})")
    causal = bool(module.is_causal if is_causal is None else is_causal)
    window = (-1, -1)
    if sliding_window is not None and key.shape[2] > sliding_window:
        window = (sliding_window - 1, sliding_window - 1)
    out = cf_torch.flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                   dropout_p=dropout, softmax_scale=scaling, causal=causal, window_size=window,
                                   softcap=0.0 if softcap is None else softcap)
    return out, None


def register(name: str = _NAME) -> str:
    """Registers :func:`attention_forward` and FlashAttention-2's mask function under ``name`` (default
    ``"cf_attention"``) and returns the name, to pass as ``attn_implementation``.

    Raises
    ------
    ValueError
        A name containing "flash", which transformers would take for a FlashAttention kernel to import.
    """
    if "flash" in name:
        raise ValueError(f"name={name!r}: transformers treats implementations named '*flash*' as FlashAttention "
                         "kernels to import; pick a name without 'flash'")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


__all__ = ["attention_forward", "register"]
