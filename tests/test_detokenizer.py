"""Incremental detokenization (runtime/detokenizer.py) on local tokenizers, no hub: SmolLM2's byte-level BPE
(from the bundled GGUF) and SentencePiece-style tokenizers built here (Metaspace, and Llama-2's
Replace/ByteFallback/Strip decoder). Streamed pieces must add up to the right text, non-ASCII included, and stop
strings must be found across token boundaries."""

import pytest

from autodeploy.runtime.detokenizer import IncrementalDetokenizer, TextStreams, detokenize, fill_text
from autodeploy.runtime.hooks import StopOnStrings

TEXT = "naïve café 日本語 🙂 Hello world and more words!"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from autodeploy.models import smollm2

    return smollm2.load()[1]


def _sentencepiece(kind: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["▁na", "ïve", "▁caf", "é", "▁Hello", "▁world", "▁and", "▁more", "▁words", "▁", "s", "!"]
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"<0x{i:02X}>", -10.0) for i in range(256)] \
        + [(w, -1.0) for w in words]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    if kind == "metaspace":  # Mistral-style
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                                    prepend_scheme="first")])
    else:  # Llama-2-style
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(params=["byte-level", "metaspace", "llama2"])
def tokenizer(request, smollm2_tokenizer):
    return smollm2_tokenizer if request.param == "byte-level" else _sentencepiece(request.param)


def _stream(tok, ids, prompt=(), stops=()):
    d = IncrementalDetokenizer(tok, prompt, stops)
    pieces = [d.add(t) for t in ids] + [d.finish()]
    return pieces, d


def test_streamed_pieces_add_up_to_the_text(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    naive = "".join(tokenizer.decode([t]) for t in ids)
    assert naive != TEXT  # one token at a time is wrong for this tokenizer (U+FFFD or lost spaces)
    pieces, d = _stream(tokenizer, ids)
    assert "".join(pieces) == d.text == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert detokenize(tokenizer, [], ids)[0] == TEXT


def test_first_generated_word_keeps_its_space_after_the_prompt(tokenizer):
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    out = tokenizer.encode("Hello world and more", add_special_tokens=False)[len(prompt):]
    pieces, d = _stream(tokenizer, out, prompt)
    assert d.text == " world and more" and pieces[0].startswith(" ")


def test_special_tokens_are_skipped(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("Paris.", add_special_tokens=False) + [tok.eos_token_id]
    assert "".join(_stream(tok, ids)[0]) == "Paris."


@pytest.mark.parametrize("stop", ["café 日", "本", "🙂 Hel", "!"])
def test_stop_string_across_tokens_cuts_text_and_stream(tokenizer, stop):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces, d = _stream(tokenizer, ids, stops=[stop, "never there"])
    want = TEXT[:TEXT.index(stop)]
    assert d.stopped and d.matched == stop and d.text == want
    assert "".join(pieces) == want  # the stream never showed any part of the stop string
    # the detokenizer stopped at the token that completed the stop string, not later
    stopped_at = next(i for i in range(1, len(ids) + 1) if detokenize(tokenizer, [], ids[:i], [stop])[1])
    assert d.num_tokens == stopped_at


def test_possible_stop_prefix_is_held_back_then_released(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("Hello world", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, (), ["world peace"])
    shown = "".join(d.add(t) for t in ids)
    assert shown == "Hello " and d.text == "Hello world"  # "world" could begin the stop string
    assert d.finish() == "world" and not d.stopped


def test_stop_on_strings_matches_across_tokens_and_samples(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = tok.encode("Say:", add_special_tokens=False)
    out = tok.encode(" naïve café", add_special_tokens=False)
    crit = StopOnStrings(["ve ca"], tok.decode, prompt_len=len(prompt))  # a bound decode works as the tokenizer
    a, b = list(prompt), list(prompt)
    hits = []
    for t in out:
        a.append(t)
        hits.append(crit(a, t))
        b.append(t)
        assert crit(b, t) == hits[-1]  # a second sample has its own text
    assert hits.index(True) > 0 and crit.matched == "ve ca"
    assert not StopOnStrings(["Say"], tok, prompt_len=len(prompt))(prompt + out[:1], out[0])  # prompt not searched


def test_text_streams_and_fill_text_agree(smollm2_tokenizer):
    from autodeploy.runtime.request import CompletionOutput, RequestMetrics, RequestOutput

    tok = smollm2_tokenizer
    prompt = tok.encode("Q:", add_special_tokens=False)
    ids = tok.encode(" 日本語 🙂 ok", add_special_tokens=False)
    streams = TextStreams(tok)
    pieces = [streams.add(("r", 0), t, prompt_ids=prompt, stop_strings=["ok"], last=i == len(ids) - 1)
              for i, t in enumerate(ids)]
    out = RequestOutput(request_id="r", prompt_ids=prompt, output_ids=ids, samples=[ids], finish_reason="stop",
                        metrics=RequestMetrics(),
                        outputs=[CompletionOutput(0, ids, None, None, "stop")])
    fill_text(out, tok, ["ok"])
    assert "".join(pieces) == out.text == out.outputs[0].text == " 日本語 🙂 "
    assert streams.keys() == [] and TextStreams(None).add("k", 1, prompt_ids=[]) is None
