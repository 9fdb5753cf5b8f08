"""The real default model (SmolLM2-135M-Instruct from the bundled GGUF) and real local checkpoints.

SmolLM2 is loaded once per session (the converted checkpoint is cached on disk, the float weights in memory)
and compiled once per module. Checkpoint tests save tiny Gemma2 / gpt-oss / bf16 Llama models with
``save_pretrained`` and load them with ``LLM(dir)`` / ``compile(dir)``, as a user's local checkpoint."""

import pytest
import torch

import autodeploy
from autodeploy import InvalidRequestError, SamplingConfig, UnsupportedModelError
from autodeploy.metadata import SequenceChunk
from helpers import hf_greedy, rel_rms
from model_zoo import make_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def smollm2():
    from autodeploy.models import smollm2

    model, tokenizer, _ = smollm2.load()
    return model, tokenizer


@pytest.fixture(scope="module")
def llm():
    return autodeploy.LLM("smollm2", max_batch_size=4, max_seq_len=160, cache_dir=None)


def _hf_eager(model):
    model.set_attn_implementation("eager")
    return model


def _all_logits(cm, prompts):
    """Logits of every token of every prompt, all prompts in one mixed prefill step."""
    chunks, nxt = [], 0
    for p in prompts:
        n = -(-len(p) // cm.page_size)
        chunks.append(SequenceChunk(p, 0, list(range(nxt, nxt + n))))
        nxt += n
    batch = cm.pack(chunks, all_logits=True)
    logits = cm.forward(batch)
    return [logits[[r for r, s in enumerate(batch.logits_rows) if s == i]].float() for i in range(len(prompts))]


def test_gguf_gives_a_llama_with_a_chat_template(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert next(model.parameters()).dtype == torch.float32 and tok.chat_template
    from autodeploy.models import smollm2 as source

    other, _, notes = source.load()
    assert other is not model and "reused from this process" in notes[0]
    other.to(torch.bfloat16)  # each load is a fresh copy: casting one leaves the next untouched
    assert next(source.load()[0].parameters()).dtype == torch.float32


def test_compiled_smollm2_matches_hf_eager(llm, smollm2):
    model, tok = smollm2
    ref_model = _hf_eager(model)
    prompts = [llm.chat_prompt(QUESTION), tok.encode("The quick brown fox", add_special_tokens=False)]
    for p, got in zip(prompts, _all_logits(llm.compiled, prompts)):
        with torch.no_grad():
            ref = ref_model(torch.tensor([p])).logits[0].float()
        assert rel_rms(got, ref) < 1e-4
    outs = llm.generate(prompts, SamplingConfig(max_new_tokens=12, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.output_ids == hf_greedy(ref_model, p, 12)


def test_chat_answers_and_takes_one_or_many_conversations(llm):
    one = llm.chat(QUESTION, SamplingConfig(max_new_tokens=16))
    assert len(one) == 1 and "Paris" in one[0].text and one[0].outputs[0].text == one[0].text
    two = llm.chat([QUESTION, [{"role": "user", "content": "What is 2 + 2?"}]], SamplingConfig(max_new_tokens=12))
    assert len(two) == 2 and "Paris" in two[0].text and "4" in two[1].text
    assert llm.explain().splitlines()[1].startswith("  loaded: smollm2")
    with pytest.raises(InvalidRequestError, match="role"):
        llm.chat([{"text": "no role"}])


def test_streamed_text_equals_final_text_non_ascii(llm):
    prompt = llm.chat_prompt([{"role": "user", "content": "Translate to French: naïve café, 日本語 🙂"}])
    pieces, final = [], None
    for ev in llm.generate_stream([prompt], SamplingConfig(max_new_tokens=24, ignore_eos=True)):
        pieces.append(ev.text)
        if ev.finished:
            final = ev.output
    assert final is not None and "".join(pieces) == final.text == final.outputs[0].text
    assert "\ufffd" not in final.text
    assert final.text == llm.tokenizer.decode(final.output_ids, skip_special_tokens=True)


def test_stop_string_split_across_tokens_stops_generation(llm):
    prompt = llm.chat_prompt(QUESTION)
    full = llm.generate([prompt], SamplingConfig(max_new_tokens=16, ignore_eos=True))[0]
    tok = llm.tokenizer
    # a stop string that ends inside one token and begins in the one before it
    pieces = [tok.decode(full.output_ids[:i]) for i in range(len(full.output_ids) + 1)]
    k = next(i for i in range(2, len(pieces)) if len(pieces[i]) - len(pieces[i - 1]) >= 2
             and len(pieces[i - 1]) - len(pieces[i - 2]) >= 2)
    stop = pieces[k - 1][-1] + pieces[k][len(pieces[k - 1])]
    cut = full.text.find(stop)
    out = llm.generate([prompt], SamplingConfig(max_new_tokens=16, ignore_eos=True, stop_strings=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == full.text[:cut]
    assert len(out.output_ids) < len(full.output_ids)
    streamed = "".join(ev.text for ev in llm.generate_stream(
        [prompt], SamplingConfig(max_new_tokens=16, ignore_eos=True, stop_strings=[stop])))
    assert streamed == out.text


def test_invalid_input_raises_before_any_work(llm):
    with pytest.raises(InvalidRequestError, match="prompt 1: token id 99999 is outside the vocabulary"):
        llm.generate([[1, 2], [99999]])
    assert not llm.engine.has_work()
    assert len(llm.compiled.generate([1, 2, 3], max_new_tokens=2)) == 1  # one prompt, as LLM.generate takes it


# ---------------------------------------------------------------- local checkpoints


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_checkpoint_that_refuses_sdpa_falls_back_to_eager(tmp_path, family):
    if family == "gemma2":
        model = make_model("gemma2", attn_implementation="eager")
    else:
        from transformers import GptOssConfig, GptOssForCausalLM

        torch.manual_seed(0)
        model = GptOssForCausalLM(GptOssConfig(
            vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=256, sliding_window=6)).eval()
    model.save_pretrained(tmp_path)
    try:
        cm = autodeploy.compile(str(tmp_path), max_batch_size=2, max_seq_len=64, page_size=4)
    except UnsupportedModelError as exc:
        if family == "gpt_oss":  # loading must work; the compiler may refuse the architecture by name
            assert "sdpa" not in str(exc), exc
            pytest.skip(f"gpt-oss loads but does not compile yet: {exc}")
        raise
    assert "attention implementation eager (HF refuses sdpa" in cm.explain()
    assert "dtype float32 (from the checkpoint config)" in cm.explain()
    ref = model.eval()
    prompt = [3, 17, 42, 5, 9, 11, 2]
    with torch.no_grad():
        want = ref(torch.tensor([prompt])).logits[0].float()
    assert rel_rms(_all_logits(cm, [prompt])[0], want) < 1e-4
    assert cm.generate([prompt], max_new_tokens=6, ignore_eos=True)[0] == hf_greedy(ref, prompt, 6)


def test_checkpoint_dtype_comes_from_its_config(tmp_path, capfd):
    make_model("llama", dtype=torch.bfloat16).save_pretrained(tmp_path)
    capfd.readouterr()
    cm = autodeploy.compile(str(tmp_path), max_batch_size=2, max_seq_len=32, page_size=4)
    assert "Loading weights" not in capfd.readouterr().err  # no transformers progress bar on every load
    assert cm.dtype == torch.bfloat16 and "dtype bfloat16 (from the checkpoint config)" in cm.explain()
    cm32 = autodeploy.compile(str(tmp_path), max_batch_size=2, max_seq_len=32, page_size=4, dtype=torch.float32)
    assert cm32.dtype == torch.float32 and "dtype float32 (requested)" in cm32.explain()


def test_meta_device_model_is_refused_by_name():
    from transformers import AutoModelForCausalLM

    config = make_model("llama").config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="weights on the meta device"):
        autodeploy.compile(model, max_seq_len=32)


def test_truncated_safetensors_names_the_file(tmp_path):
    make_model("llama").save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UnsupportedModelError, match=r"model\.safetensors: the weight file is corrupt or truncated"):
        autodeploy.compile(str(tmp_path), max_seq_len=32)


def test_unknown_names_and_missing_devices_are_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="unknown builtin model 'foo'; choose from .*tiny-llama"):
        autodeploy.compile("builtin:foo", max_seq_len=32)
    with pytest.raises(UnsupportedModelError, match="nor a named model"):
        autodeploy.compile("no-such-model", max_seq_len=32)
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedModelError, match="no CUDA device is available"):
            autodeploy.compile("builtin", device="cuda", max_seq_len=32)
