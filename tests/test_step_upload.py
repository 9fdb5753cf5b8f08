"""The step-input upload: staged bytes land on the device unchanged except the token slots, which come from the
device tokens (kernel under the CPU interpreter or on a GPU; the copy-engine fallback); the packer wires it."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from autodeploy.metadata import SequenceChunk, nest_sequences  # noqa: E402
from autodeploy.metadata.upload import upload  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("n_words,tok_at,n_tok", [(3, 0, 0), (5, 0, 3), (2500, 1020, 9), (2048, 2040, 8)])
def test_upload_copies_bytes_and_token_slots(use_kernel, n_words, tok_at, n_tok):
    g = torch.Generator().manual_seed(n_words + n_tok)
    host = torch.randint(0, 256, (8 * n_words,), dtype=torch.uint8, generator=g)
    if DEV == "cuda":
        host = host.pin_memory()
    dev = torch.zeros(8 * n_words, dtype=torch.uint8, device=DEV)
    tokens = torch.randint(0, 2**40, (n_tok,), generator=g).to(DEV) if n_tok else None
    upload(host, dev, tokens, tok_at, use_kernel=use_kernel)
    want = host.clone().view(torch.int64)
    if n_tok:
        want[tok_at:tok_at + n_tok] = tokens.cpu()
    assert torch.equal(dev.cpu().view(torch.int64), want)


def test_upload_rejects_tokens_past_the_buffer():
    with pytest.raises(ValueError, match="do not fit"):
        upload(torch.zeros(16, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8, device=DEV),
               torch.zeros(3, dtype=torch.int64, device=DEV), 0, use_kernel=True)


def test_packer_takes_input_tokens_from_the_device():
    chunks = [SequenceChunk([0], 5, [2, 3]), SequenceChunk([0], 2, [4])]  # placeholders for the tokens
    src = torch.tensor([11, 22], device=DEV)
    b = nest_sequences(chunks, 4, DEV, token_src=src, pad_to=4, pad_page=9, pages_width=3)
    assert b.inputs["input_ids"].view(-1).tolist() == [11, 22, 0, 0]  # padding rows keep their staged token
    assert b.inputs["position_ids"].view(-1).tolist() == [5, 2, 0, 0]
    # the general path (a prefill chunk first) would reorder the decode rows behind it: refused
    with pytest.raises(ValueError, match="reorders"):
        nest_sequences([SequenceChunk([0], 5, [2, 3]), SequenceChunk([1, 2, 3], 0, [4])], 4, DEV, token_src=src[:1])
