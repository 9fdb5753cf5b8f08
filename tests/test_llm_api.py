"""The user-facing API: a local checkpoint directory with a tokenizer, string prompts, stop strings, the HF
generation_config, streaming, metrics, and the CLI."""

import subprocess
import sys

import pytest
import torch

import autodeploy
from autodeploy import SamplingConfig
from model_zoo import make_model


def _word_tokenizer(vocab_size=128):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model = make_model("llama", seed=11)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    _word_tokenizer().save_pretrained(path)
    return path, model


def test_checkpoint_directory_with_string_prompts(checkpoint):
    path, model = checkpoint
    llm = autodeploy.LLM(str(path), max_batch_size=4, max_seq_len=64, page_size=4)
    out = llm.generate(["w1 w2 w3", "w9 w8"], SamplingConfig(max_new_tokens=6, ignore_eos=True))
    ref = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 3:]
    assert out[0].output_ids == ref.tolist()
    # decoded with the prompt as context, so the first word keeps its leading space (as vLLM and HF pipelines do)
    assert out[0].text == "".join(f" w{t}" for t in ref.tolist())


def test_stop_strings_trim_text(checkpoint):
    path, _ = checkpoint
    llm = autodeploy.LLM(str(path), max_batch_size=4, max_seq_len=64, page_size=4)
    full = llm.generate(["w1 w2 w3"], SamplingConfig(max_new_tokens=8, ignore_eos=True))[0]
    words = full.text.split()
    stop = words[2]
    out = llm.generate(["w1 w2 w3"], SamplingConfig(max_new_tokens=8, ignore_eos=True, stop_strings=[stop]))[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text and full.text.startswith(out.text)


def test_generation_config_is_honoured(checkpoint):
    path, model = checkpoint
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path)
    greedy = autodeploy.LLM(m, max_batch_size=2, max_seq_len=64, page_size=4).generate(
        [[1, 2, 3]], SamplingConfig(max_new_tokens=10, ignore_eos=True))[0].output_ids
    m.generation_config.eos_token_id = greedy[3]
    m.generation_config.do_sample = True
    m.generation_config.temperature = 0.7
    llm = autodeploy.LLM(m, max_batch_size=2, max_seq_len=64, page_size=4)
    assert llm.default_sampling.temperature == 0.7
    out = llm.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=10))[0]  # greedy, EOS from the config
    assert out.output_ids == greedy[:greedy.index(greedy[3]) + 1] and out.finish_reason == "stop"


def test_metrics_are_reported(checkpoint):
    path, _ = checkpoint
    llm = autodeploy.LLM(str(path), max_batch_size=2, max_seq_len=64, page_size=4)
    m = llm.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=5, ignore_eos=True))[0].metrics
    assert m.num_generated == 5 and m.ttft > 0 and m.tpot > 0 and m.num_prompt_tokens == 3


def test_cli_generate_streams_builtin():
    res = subprocess.run([sys.executable, "-m", "autodeploy.entrypoints.cli", "generate", "--model", "builtin", "--prompt",
                          "1,2,3", "--max-new-tokens", "5", "--max-seq-len", "64"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(res.stdout.split()) == 5
    assert "5 tokens" in res.stderr


def test_cli_reports_bad_input_cleanly():
    res = subprocess.run([sys.executable, "-m", "autodeploy.entrypoints.cli", "generate", "--model", "/no/such/dir",
                          "--prompt", "hi"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "error:" in res.stderr and "Traceback" not in res.stderr


def test_cli_bench_reports_json(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "-m", "autodeploy.entrypoints.cli", "bench", "--num-requests", "12", "--input-len",
                          "4:12", "--output-len", "4:8", "--max-batch-size", "8", "--max-seq-len", "64",
                          "--arrival-rate", "200", "--no-progress", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    data = json.loads(out.read_text())
    assert data["requests"] == 12 and data["errors"] == 0
    assert data["host_overhead_per_step_s"]["p50"] > 0 and data["ttft_s"]["p50"] > 0


def test_json_logging(capsys):
    import json
    import logging

    autodeploy.configure_logging("INFO", json_format=True)
    logging.getLogger("autodeploy.test").info("hello %s", "world", extra={"step": 3})
    line = capsys.readouterr().err.strip().splitlines()[-1]
    rec = json.loads(line)
    assert rec["msg"] == "hello world" and rec["step"] == 3 and rec["level"] == "INFO"
    autodeploy.configure_logging("WARNING", json_format=False)
