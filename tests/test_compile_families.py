"""Every supported family, both attention implementations: compiled logits match HF eager on a mixed batch
(chunked prefill + decode + prefill in one step, contexts crossing page boundaries), and greedy generation
matches HF ``generate`` token for token."""

import zlib

import pytest
import torch

import autodeploy
from autodeploy.runtime.sampling import SamplingConfig
from helpers import assert_mixed_batch_matches_hf, hf_greedy
from model_zoo import FAMILIES, make_model

CASES = [(f, impl) for f in FAMILIES for impl in ("sdpa", "eager") if not (f == "gemma2" and impl == "sdpa")]


@pytest.mark.parametrize("family,impl", CASES)
def test_logits_match_hf_on_mixed_batch(family, impl):
    model = make_model(family, impl)
    cm = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48)
    g = torch.Generator().manual_seed(zlib.crc32(family.encode()) % 1000)  # str hash() differs per process
    seqs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 13, 7)]
    assert_mixed_batch_matches_hf(cm, model, seqs, f"{family}/{impl}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_hf(family):
    impl = "eager" if family == "gemma2" else "sdpa"
    model = make_model(family, impl, seed=3)
    cm = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 11, 1)]
    outs = cm.generate(prompts, sampling=SamplingConfig(max_new_tokens=32, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o == hf_greedy(model, p, 32), f"{family}: prompt of {len(p)} tokens diverged"


# --- attention variants and older eager forms (autodeploy/ops/variants/) -----------------------------------------
# family -> (attention implementations HF runs it with, variant parameters every attention layer must carry)
VARIANT_CASES = {
    "bloom": (("eager",), {"alibi_slopes"}),
    "mpt": (("eager",), {"alibi_slopes"}),
    "falcon_alibi": (("eager", "sdpa"), {"alibi_slopes"}),
    "gpt_oss": (("eager",), {"sinks"}),
    "granite_swa": (("eager",), {"sinks"}),
    "llama4": (("sdpa", "eager"), {"chunk_size"}),
    "codegen": (("eager",), set()),
    "gpt_neo": (("eager",), set()),
    "xglm": (("eager",), set()),
    "openai_gpt": (("eager",), set()),
    "gpt_neox_japanese": (("eager",), set()),
}
@pytest.fixture(scope="module")
def variant_models():
    cache = {}

    def get(family, impl):
        if (family, impl) not in cache:
            model = make_model(family, impl)
            cm = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48)
            cache[family, impl] = model, cm
        return cache[family, impl]

    return get


@pytest.mark.parametrize("family,impl", [(f, i) for f, (impls, _) in VARIANT_CASES.items() for i in impls])
def test_variant_family_matches_hf_on_mixed_batch(variant_models, family, impl):
    model, cm = variant_models(family, impl)
    expected = VARIANT_CASES[family][1]
    for spec in cm.ctx.attention_specs:
        assert {name for name, _ in spec.params} >= expected, f"layer {spec.layer}: {spec.features()}"
    if family == "llama4":  # chunked layers (RoPE) and full-attention layers (NoPE) alternate
        assert any(spec.param("chunk_size") for spec in cm.ctx.attention_specs)
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 13, 7)]
    assert_mixed_batch_matches_hf(cm, model, seqs, f"{family}/{impl}")


@pytest.mark.parametrize("family", list(VARIANT_CASES))
def test_variant_family_greedy_matches_hf(variant_models, family):
    model, cm = variant_models(family, VARIANT_CASES[family][0][0])
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (6, 17)]
    outs = cm.generate(prompts, sampling=SamplingConfig(max_new_tokens=24, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o == hf_greedy(model, p, 24), f"{family}: prompt of {len(p)} tokens diverged"
