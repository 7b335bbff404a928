"""Hugging Face transformers: cuflash as an attention implementation (``attn_implementation="cf_attention"``).

    >>> import cuflash.integrations.transformers as cf_hf
    >>> name = cf_hf.register()                            # once per process: "cf_attention"
    >>> model = AutoModelForCausalLM.from_config(config, attn_implementation=name)

:func:`register` adds :func:`attention_forward` to ``transformers.AttentionInterface`` and, under the same
name, FlashAttention-2's mask function to ``AttentionMaskInterface``: models then build no dense mask at all
(``None`` when nothing is padded, the 2-D padding mask otherwise), exactly as with
``attn_implementation="flash_attention_2"``. Unpadded batches run the dense kernels; padded batches (the
real tokens packed, then scattered back) and packed sequences (``DataCollatorWithFlattening``) run
:func:`cuflash.attention_varlen` (the variable-length kernels on the GPU, the NumPy path on the CPU).
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
        What the registered mask function built: None when no token is padded, else the 2-D padding mask
        (1 = real token), served by variable-length attention. A 4-D mask raises NotImplementedError.
    dropout : float
        Attention dropout (transformers passes the model's rate in training): unpadded batches, CPU or
        CUDA, the seed drawn from torch's default generator; padded / packed batches (variable-length
        attention) raise NotImplementedError for ``dropout > 0``.
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
        A 4-D mask, ``dropout > 0`` with padding / packing, attention sinks (``s_aux``), a
        value head dim that differs from the query's, packed sequences (position ids that restart) with a
        KV cache.

    Notes
    -----
    Packed sequences in one row come either with their boundaries (``cu_seq_lens_q`` / ``cu_seq_lens_k``,
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) or with position ids alone that restart at
    0 for each sequence (the collator's default); both run variable-length attention.
    """
    if s_aux is not None:
        raise NotImplementedError("cuflash attention has no attention sinks (s_aux)")
    if value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(f"cuflash attention needs the value head dim ({value.shape[-1]}) to equal the "
                                  f"query head dim ({query.shape[-1]})")
    causal = bool(module.is_causal if is_causal is None else is_causal)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (batch, seqlen, heads, d)
    window = (-1, -1)
    if sliding_window is not None and k.shape[1] > sliding_window:
        window = (sliding_window - 1, sliding_window - 1)
    opts = dict(dropout_p=dropout, softmax_scale=scaling, causal=causal, window_size=window,
                softcap=0.0 if softcap is None else softcap)
    if attention_mask is not None:
        return _padded(q, k, v, attention_mask, opts), None
    if kwargs.get("cu_seq_lens_q") is not None:
        return _packed(q, k, v, kwargs, opts), None
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and q.shape[0] == 1 and _restarts(position_ids):
        return _packed_by_positions(q, k, v, position_ids, opts), None
    return cf_torch.flash_attn_func(q, k, v, **opts), None


def _restarts(position_ids) -> bool:
    """Whether one row's position ids restart (packed sequences without cu_seq_lens: DataCollatorWithFlattening's
    default output), as transformers' FlashAttention path decides: they differ from a plain count up from their
    first value. Reads the ids on the host (a synchronization on the GPU, as in transformers' own path)."""
    row = position_ids.reshape(-1)
    return row.numel() > 1 and bool((row != row[0] + torch.arange(row.numel(), device=row.device)).any())


def _packed_by_positions(q, k, v, position_ids, opts):
    """Packed sequences known only by their position ids: a sequence starts where the ids are 0 (and at the row's
    first token), as transformers' FlashAttention path derives cu_seqlens."""
    total = q.shape[1]
    if k.shape[1] != total or position_ids.shape[-1] != total:
        raise NotImplementedError(f"packed sequences (position ids that restart) with {total} query and {k.shape[1]} "
                                  f"key tokens and {position_ids.shape[-1]} position ids; cuflash takes them when "
                                  "all three are equal (no KV cache)")
    row = position_ids.reshape(-1)
    starts = (row == 0).nonzero().squeeze(1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_full((1,), total)]).to(torch.int32)
    longest = int(cu.diff().max())
    return cf_torch.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, longest, longest, **opts)[None]


def _padded(q, k, v, mask, opts):
    """A padded batch (the 2-D mask FlashAttention-2's mask function leaves, 1 = real token): the real tokens
    packed, variable-length attention, the result scattered back (padded query rows 0)."""
    if mask.dim() != 2:
        raise NotImplementedError(f"cuflash attention takes a 2-D padding mask, got a {mask.dim()}-D mask")
    batch, seqlen_q = q.shape[:2]
    mask = mask[:, -k.shape[1]:].to(torch.bool)
    k, v = k[:, :mask.shape[1]], v[:, :mask.shape[1]]
    lens_k = mask.sum(-1, dtype=torch.int32)
    cu_k = torch.nn.functional.pad(torch.cumsum(lens_k, 0, dtype=torch.int32), (1, 0))
    keep_k = mask.flatten().nonzero().squeeze(1)
    k_packed, v_packed = (x.reshape(-1, *x.shape[2:]).index_select(0, keep_k) for x in (k, v))
    # Queries: the same tokens as the keys (training, prefill), else the last seqlen_q positions of each row
    # (decoding after left padding), as transformers' FlashAttention-2 path takes them.
    mask_q = mask[:, -seqlen_q:]
    lens_q = mask_q.sum(-1, dtype=torch.int32)
    cu_q = torch.nn.functional.pad(torch.cumsum(lens_q, 0, dtype=torch.int32), (1, 0))
    keep_q = mask_q.flatten().nonzero().squeeze(1)
    q_packed = q.reshape(-1, *q.shape[2:]).index_select(0, keep_q)
    out = cf_torch.flash_attn_varlen_func(q_packed, k_packed, v_packed, cu_q, cu_k, int(lens_q.max()),
                                          int(lens_k.max()), **opts)
    full = out.new_zeros(batch * seqlen_q, *out.shape[1:])
    return full.index_copy(0, keep_q, out).reshape(batch, seqlen_q, *out.shape[1:])


def _packed(q, k, v, kwargs, opts):
    """Packed sequences in one row (DataCollatorWithFlattening: transformers passes their boundaries as
    cu_seq_lens_q / cu_seq_lens_k): variable-length attention over them directly."""
    if q.shape[0] != 1:
        raise NotImplementedError("cuflash attention expects packed sequences in a batch of one row")
    cu_q, cu_k = (kwargs[n].to(torch.int32) for n in ("cu_seq_lens_q", "cu_seq_lens_k"))
    max_q, max_k = (int(kwargs.get(n) or int(c.diff().max())) for n, c in (("max_length_q", cu_q),
                                                                           ("max_length_k", cu_k)))
    out = cf_torch.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, max_q, max_k, **opts)
    return out[None]


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
