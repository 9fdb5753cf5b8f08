"""Debug helper: export a small Llama on the current device and print the full export error, if any."""
import sys

import torch
from torch.export import Dim
from transformers import LlamaConfig, LlamaForCausalLM

from autodeploy.models.factory import _LogitsOnly

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=4096)
with torch.device(dev):
    m = LlamaForCausalLM(cfg).eval()
ids = torch.zeros(2, 4, dtype=torch.long, device=dev)
pos = torch.arange(4, device=dev).expand(2, 4).contiguous()
for smin in (1, 2):
    b = Dim("batch", min=1, max=8)
    s = Dim("seq", min=smin, max=2048)
    try:
        torch.export.export(_LogitsOnly(m), (ids, pos), dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}), strict=False)
        print(dev, "seq min", smin, "ok")
    except Exception as e:
        print(dev, "seq min", smin, "FAILED:", str(e)[:3000])
