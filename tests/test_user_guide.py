"""docs/user-guide.md runs as written: its python blocks are executed in order in one namespace, on the real
SmolLM2 model (a block marked ``<!-- skip-test -->`` on the line before it needs a GPU or a server and is
skipped). Selecting one block runs the blocks before it first, as a reader would."""

import pathlib
import re

import pytest

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "user-guide.md"
SKIP = "<!-- skip-test -->"


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, code, skipped)`` of every python block."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            j = start
            while lines[j].strip() != "```":
                j += 1
            before = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            blocks.append((start + 1, "\n".join(lines[start:j]), before == SKIP))
            i = j
        i += 1
    return blocks


BLOCKS = python_blocks(GUIDE.read_text())
# What some blocks must have produced (the guide's comments promise it).
CHECKS = {
    "answers = llm.chat": lambda ns: "Paris" in ns["answers"][0].text,
    "llm.generate([[1, 2, 3], [10**6]])": lambda ns: ns["message"].startswith("prompt 1: token id 1000000"),
    "pieces = []": lambda ns: "".join(ns["pieces"]) != "",
    "outs = llm.generate([\"The capital": lambda ns: len(ns["outs"]) == 2 and all(o.text for o in ns["outs"]),
}

_state = {"ns": {"__name__": "user_guide"}, "done": 0}


def _run_through(index: int) -> None:
    while _state["done"] <= index:
        line, code, skipped = BLOCKS[_state["done"]]
        _state["done"] += 1
        if skipped:
            continue
        exec(compile(code, f"{GUIDE}:{line}", "exec"), _state["ns"])
        for marker, check in CHECKS.items():
            if marker in code:
                assert check(_state["ns"]), f"block at line {line}: {marker!r} did not produce what the guide says"


def test_guide_covers_the_api():
    text = GUIDE.read_text()
    for heading in ("## `LLM`", "## `SamplingConfig`", "## Chat", "## Streaming", "## Serving", "## Benchmarking",
                    "## Command line"):
        assert heading in text
    assert "<!-- serve:" in text  # the section the server's documentation extends
    assert sum(not s for _, _, s in BLOCKS) >= 6 and any(s for _, _, s in BLOCKS)
    assert re.search(r"min_tokens", text) and re.search(r"logprobs", text)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"line{b[0]}" for b in BLOCKS])
def test_guide_block_runs(index, capsys):
    if BLOCKS[index][2]:
        _run_through(index)
        pytest.skip(f"marked {SKIP} (needs a GPU or a server)")
    _run_through(index)
