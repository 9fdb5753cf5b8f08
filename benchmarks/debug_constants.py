"""Debug helper: list the non-parameter tensor constants of a compiled graph and their users."""
import torch

import autodeploy
from autodeploy.graph_utils import getattr_path
from autodeploy.models.builtin import build_builtin

m = build_builtin("tiny-llama", dtype=torch.bfloat16, device="cuda")
cm = autodeploy.compile(m, max_batch_size=4, max_seq_len=128)
for gm_name, gm in (("graph_module", cm.graph_module), ("runner", cm._runner)):
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not n.target.startswith("m."):
            v = getattr_path(gm, n.target)
            print(gm_name, n.target, type(v).__name__, getattr(v, "device", None), getattr(v, "shape", None),
                  [(u.name, str(u.target)) for u in n.users])
