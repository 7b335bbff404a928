"""cuflash as a Hugging Face transformers attention implementation (cuflash.integrations.transformers), on
the CPU path: a Llama, a sliding-window Mistral and a softcapped Gemma 2 built from configs (random weights, no download) give
the same logits, loss, gradients and greedy generations with cuflash's attn_implementation as with "sdpa",
unpadded, padded (variable-length attention on the real tokens) and packed into one row."""

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
