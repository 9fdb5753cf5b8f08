"""The command line: help text, the subcommand registry, one-line errors (exit 2) for bad input, text generation
on the default model, and bench's JSON output. Error paths run in-process (no compile happens before them)."""

import json
import subprocess
import sys

import pytest
import torch

from autodeploy.entrypoints import cli


def _run(*argv, timeout=600):
    return subprocess.run([sys.executable, "-m", "autodeploy.entrypoints.cli", *argv], capture_output=True,
                          text=True, timeout=timeout)


def _help(argv, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    return capsys.readouterr().out


def test_help_lists_models_lowerings_and_has_no_backticks(capsys):
    top = _help(["--help"], capsys)
    assert "`" not in top and "smollm2" in top and "builtin:NAME" in top and "tiny-llama" in top
    for name in ("demo", "generate", "bench"):
        assert name in top
    gen = _help(["generate", "--help"], capsys)
    assert "cudagraph-piecewise" in gen and "llama-3.2-1b" in gen and "smollm2 (default" in gen
    assert "--prompt PROMPT       the prompt text" in gen
    assert "--stop TEXT" in gen and "--min-tokens" in gen and "--logprobs" in gen


def test_subcommands_are_a_registry(monkeypatch, capsys):
    monkeypatch.setattr(cli, "SUBCOMMANDS", cli.SUBCOMMANDS + [
        cli.Subcommand("hello", "say hello", "test_cli:_hello_run", "test_cli:_hello_args", compile_flags=False)])
    assert cli.main(["hello", "--name", "x"]) == 0
    assert capsys.readouterr().out == "hello x\n"


def _hello_args(p):
    p.add_argument("--name")


def _hello_run(args):
    print(f"hello {args.name}")
    return 0


def _error_line(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unknown_builtin_is_one_line(capsys):
    line = _error_line(capsys, ["generate", "--model", "builtin:foo", "--prompt", "1,2"])
    assert "unknown builtin model 'foo'" in line and "tiny-llama" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(capsys):
    line = _error_line(capsys, ["generate", "--model", "builtin", "--device", "cuda", "--prompt", "1,2"])
    assert "no CUDA device is available" in line


def test_text_prompt_on_a_tokenizerless_model_fails_before_compiling(capsys, monkeypatch):
    import autodeploy.compiler.driver as driver

    monkeypatch.setattr(driver, "compile", lambda *a, **k: pytest.fail("compiled before checking the prompt"))
    line = _error_line(capsys, ["generate", "--model", "builtin", "--prompt", "Hello world"])
    assert "no tokenizer" in line and "token ids" in line


def test_out_of_vocabulary_id_is_reported_once(capsys):
    line = _error_line(capsys, ["generate", "--model", "builtin", "--prompt", "5000", "--max-seq-len", "32",
                                "--cache-dir", "none"])
    assert "token id 5000 is outside the vocabulary" in line


def test_bad_compile_setting_is_one_line(capsys):
    line = _error_line(capsys, ["generate", "--model", "builtin", "--prompt", "1", "--max-seq-len", "1"])
    assert "max_seq_len" in line


def test_generate_chat_prints_text_on_the_default_model(capsys):
    assert cli.main(["generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "12",
                     "--max-seq-len", "96", "--max-batch-size", "2", "--cache-dir", "none"]) == 0
    out = capsys.readouterr()
    assert "Paris" in out.out and "tokens" in out.err


def test_bench_json_goes_to_the_file_only(tmp_path):
    path = tmp_path / "bench.json"
    res = _run("bench", "--model", "builtin", "--num-requests", "6", "--input-len", "4:8", "--output-len", "3:5",
               "--max-batch-size", "4", "--max-seq-len", "32", "--no-progress", "--cache-dir", "none",
               "--json", str(path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "{" not in res.stdout and "output tokens/s" in res.stdout
    data = json.loads(path.read_text())
    assert data["gc_frozen"] is True  # the bench process serves one model: its start-up objects leave the GC
    slowest = data["step_kinds"]["decode"]["slowest"]
    phases = {f"{p}_ms" for p in ("schedule", "pack", "forward", "sample", "bookkeeping")}
    assert slowest and set(slowest[0]) == {"ms", "seqs", "tokens"} | phases
    medians = data["step_kinds"]["decode"]["phase_median_ms"]
    assert {f"{p}_ms" for p in medians} == phases and all(v >= 0 for v in medians.values())
