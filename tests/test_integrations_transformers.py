"""cuflash as a Hugging Face transformers attention implementation (cuflash.integrations.transformers), on
the CPU path: a Llama, a sliding-window Mistral and a softcapped Gemma 2 built from configs (random weights, no download) give
the same logits, loss, gradients and greedy generations with cuflash's attn_implementation as with "sdpa",
unpadded, padded (variable-length attention on the real tokens) and packed into one row; on the GPU
(gpu-marked) a bf16 Llama's padded and packed logits follow FlashAttention's rule against an fp32 model and
20 training steps on packed batches track SDPA on the padded ones."""

import pytest

torch = pytest.importorskip("torch", reason="the transformers integration needs torch")
transformers = pytest.importorskip("transformers", reason="the transformers integration needs transformers")

import cuflash.integrations.transformers as cf_hf  # noqa: E402

NAME = cf_hf.register()


def _pair(config_cls, model_cls, ref_impl="sdpa", **extra):
    config = config_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    torch.manual_seed(0)
    ref = model_cls(config).eval()
    config_cf = config_cls.from_dict(config.to_dict())
    config_cf._attn_implementation = NAME
    ours = model_cls(config_cf).eval()
    ours.load_state_dict(ref.state_dict())
    ref.set_attn_implementation(ref_impl)
    return ref, ours


@pytest.mark.parametrize("arch", ["llama", "mistral_sliding_window", "gemma2_softcap"])
def test_logits_loss_and_grads_match_sdpa(arch, monkeypatch):
    """Same weights and tokens: logits, the LM loss and every parameter gradient agree with SDPA's (Gemma 2:
    the eager attention's, it has no SDPA path) to float32 rounding (GQA 4/2 heads; Mistral with a sliding
    window of 8 over 37 tokens; Gemma 2 with softcap and its own scale), and every layer's attention went
    through cuflash."""
    calls = []
    real = cf_hf.cf_torch.flash_attn_func
    monkeypatch.setattr(cf_hf.cf_torch, "flash_attn_func", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    if arch == "llama":
        ref, ours = _pair(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    elif arch == "mistral_sliding_window":
        ref, ours = _pair(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=8)
    else:  # softcap 5 (small enough to bend these scores), its own scale, sliding window on every other layer
        ref, ours = _pair(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, "eager", head_dim=16,
                          sliding_window=8, attn_logit_softcapping=5.0, query_pre_attn_scalar=24)
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(1))
    out_ref = ref(ids, labels=ids)
    out_ours = ours(ids, labels=ids)
    torch.testing.assert_close(out_ours.logits, out_ref.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_ours.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2  # one per layer
    if arch == "mistral_sliding_window":
        assert all(kw["window_size"] == (7, 7) and kw["causal"] for kw in calls)
    if arch == "gemma2_softcap":
        assert {kw["window_size"] for kw in calls} == {(7, 7), (-1, -1)}
        assert all(kw["softcap"] == 5.0 and kw["softmax_scale"] == 24 ** -0.5 for kw in calls)
    out_ref.loss.backward()
    out_ours.loss.backward()
    for (name, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_greedy_generation_matches_sdpa():
    """generate() with the KV cache (one query row against a growing cache: bottom-right causal) produces
    the same greedy tokens."""
    ref, ours = _pair(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_padded_batch_matches_sdpa():
    """A right-padded batch (the padded tokens' labels -100): logits at the real tokens, the loss and every
    gradient agree with SDPA given the same attention mask (cuflash packs the real tokens and runs
    variable-length attention)."""
    ref, ours = _pair(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    ids = torch.randint(1, 128, (3, 21), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[1, 15:] = 0
    mask[2, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out_ref, out_ours = ref(ids, attention_mask=mask, labels=labels), ours(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(out_ours.logits[real], out_ref.logits[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_ours.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    out_ref.loss.backward()
    out_ours.loss.backward()
    for (name, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_left_padded_generation_matches_sdpa():
    """generate() on a left-padded batch (queries are each row's last positions, keys its real tokens)
    produces SDPA's greedy tokens."""
    ref, ours = _pair(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_packed_sequences_match_each_sequence_alone():
    """Sequences packed into one row (DataCollatorWithFlattening: position ids restart per sequence) give
    each sequence's logits computed alone by SDPA."""
    ref, ours = _pair(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    gen = torch.Generator().manual_seed(6)
    seqs = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (7, 12, 3)]
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": s} for s in seqs])
    kw = {n: batch[n] for n in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k") if n in batch}
    logits = ours(batch["input_ids"], position_ids=batch["position_ids"], **kw).logits[0]
    start = 0
    for s in seqs:
        alone = ref(torch.tensor([s])).logits[0]
        torch.testing.assert_close(logits[start:start + len(s)], alone, rtol=1e-4, atol=1e-5)
        start += len(s)


def test_packed_by_position_ids_alone_match_each_sequence_alone():
    """DataCollatorWithFlattening's default output carries only position ids that restart per sequence (no
    cu_seq_lens): the sequences are still attended one by one, each one's logits those of SDPA on it alone
    (before the fix each sequence saw the ones packed before it, with no error)."""
    ref, ours = _pair(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    gen = torch.Generator().manual_seed(8)
    seqs = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (5, 1, 9, 4)]
    batch = transformers.DataCollatorWithFlattening()([{"input_ids": s} for s in seqs])
    assert "cu_seq_lens_q" not in batch
    logits = ours(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    start = 0
    for s in seqs:
        alone = ref(torch.tensor([s])).logits[0]
        torch.testing.assert_close(logits[start:start + len(s)], alone, rtol=1e-4, atol=1e-5)
        start += len(s)
    plain = ours(torch.tensor([seqs[2]]), position_ids=torch.arange(9)[None] + 3, use_cache=False).logits[0]
    torch.testing.assert_close(plain, ref(torch.tensor([seqs[2]]), position_ids=torch.arange(9)[None] + 3).logits[0],
                               rtol=1e-4, atol=1e-5)


# --- on the GPU: bf16 kernels against SDPA ----------------------------------------------------------------------

def _gpu_pair():
    """(fp32 SDPA reference, bf16 SDPA, bf16 cuflash) Llamas with equal weights on the GPU (hidden 256, four
    heads of 64 over two KV heads, two layers)."""
    from gpu_helpers import require_torch_cuda
    require_torch_cuda()
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    ref32 = transformers.LlamaForCausalLM(config).cuda().eval()
    ref32.set_attn_implementation("sdpa")
    models = [ref32]
    for impl in ("sdpa", NAME):
        cfg = transformers.LlamaConfig.from_dict(config.to_dict())
        cfg._attn_implementation = impl
        m = transformers.LlamaForCausalLM(cfg).cuda()
        m.load_state_dict(ref32.state_dict())
        models.append(m.to(torch.bfloat16).eval())
    return models


def _flash_rule_logits(ours, base, ref):
    """FlashAttention's rule on logits: our max error against the fp32 model <= 2x that of SDPA in bf16."""
    err = (ours.float() - ref).abs().max().item()
    base_err = (base.float() - ref).abs().max().item()
    assert err <= 2 * base_err + 1e-3, f"max logit error {err:.3e} > 2 x SDPA's {base_err:.3e}"


@pytest.mark.gpu
def test_gpu_padded_and_packed_logits_follow_flash_rule():
    """bf16 on the GPU: a right-padded batch (cuflash packs the real tokens: the variable-length kernels) and
    the same sequences packed into one row (DataCollatorWithFlattening) give logits whose error against the
    fp32 SDPA model is within 2x bf16 SDPA's, at every real token."""
    ref32, sdpa, ours = _gpu_pair()
    gen = torch.Generator().manual_seed(7)
    lens = [57, 40, 13]
    ids = torch.randint(1, 128, (3, 57), generator=gen)
    mask = (torch.arange(57)[None] < torch.tensor(lens)[:, None]).long()
    ids, mask = ids.cuda(), mask.cuda()
    real = mask.bool()
    with torch.no_grad():
        ref = ref32(ids, attention_mask=mask).logits[real]
        _flash_rule_logits(ours(ids, attention_mask=mask).logits[real], sdpa(ids, attention_mask=mask).logits[real],
                           ref)
        seqs = [ids[i, :n].tolist() for i, n in enumerate(lens)]
        batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
            [{"input_ids": s} for s in seqs])
        kw = {n: batch[n].cuda() if torch.is_tensor(batch[n]) else batch[n]
              for n in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k") if n in batch}
        packed = ours(batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(), **kw).logits[0]
        _flash_rule_logits(packed, sdpa(ids, attention_mask=mask).logits[real], ref)


@pytest.mark.gpu
def test_gpu_packed_training_matches_sdpa_padded():
    """20 AdamW steps (bf16, lr 1e-3) on packed batches through cuflash (forward and backward: the
    variable-length kernels) track 20 steps of SDPA on the same sequences right-padded: every step's loss
    within 0.03 of SDPA's (bf16 training noise between the two attention implementations, stated here)."""
    _, sdpa, ours = _gpu_pair()
    sdpa.train()
    ours.train()
    opt_ref = torch.optim.AdamW(sdpa.parameters(), lr=1e-3)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(8)
    collate = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    for step in range(20):
        lens = torch.randint(8, 120, (4,), generator=gen).tolist()
        seqs = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in lens]
        width = max(lens)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss_ref = sdpa(ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda()).loss
        batch = collate([{"input_ids": s} for s in seqs])
        kw = {n: batch[n].cuda() if torch.is_tensor(batch[n]) else batch[n]
              for n in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k") if n in batch}
        loss_ours = ours(batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(),
                         labels=batch["labels"].cuda(), **kw).loss
        assert abs(loss_ours.item() - loss_ref.item()) <= 0.03, (step, loss_ours.item(), loss_ref.item())
        for loss, opt in ((loss_ref, opt_ref), (loss_ours, opt_ours)):
            opt.zero_grad()
            loss.backward()
            opt.step()
