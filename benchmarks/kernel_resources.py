"""Compile Triton kernels for sm_90 WITHOUT a GPU and report registers, spills and shared memory.

Costs no device time: Triton's bundled ptxas/cuobjdump do the work. Use it before a GPU run to catch register
pressure (e.g. an epilogue that makes the whole kernel spill). Usage: python benchmarks/kernel_resources.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def resources(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> dict:
    """Compile ``fn`` (a @triton.jit function) for sm_90 and return {'regs', 'spill_st', 'spill_ld', 'smem'}."""
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    # What the launcher's specialisation gives real launches: pointers and strides divisible by 16
    # (without it Triton cannot prove alignment, does not vectorise, and every kernel looks register-bound).
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items()
             if ty.startswith("*") or name.startswith("stride")}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
        path = f.name
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    os.unlink(path)
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    ptx = k.asm["ptx"]
    return {"regs": int(reg.group(1)) if reg else -1, "stack": int(stack.group(1)) if stack else -1,
            "smem": k.metadata.shared, "local_ld": ptx.count("ld.local"), "local_st": ptx.count("st.local")}


def _decode_signature(kernel) -> dict:
    """Pointer args as bf16/int32/fp32 pointers, ints as i32, floats as fp32 (by name)."""
    sig = {}
    for name in kernel.arg_names:
        if name in kernel.constexprs or name.isupper():
            continue
        if name.startswith("stride") or name in ("num_kv_heads",):
            sig[name] = "i32"
        elif name in ("qk_scale", "softcap_scale", "softcap_log2"):
            sig[name] = "fp32"
        elif name in ("cu_seqlens_q", "seq_lens_kv", "page_table", "work_ptr", "split_start"):
            sig[name] = "*i32"
        elif name in ("slot_ptr",):
            sig[name] = "*i64"
        elif name in ("mid_o", "mid_lse", "sinks_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "*bf16"
    return sig


def main() -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    from autodeploy.backends.triton.kernels import attention as attn

    base = dict(GROUP=4, BLOCK_H=16, PAGE_SIZE=64, HEAD_D=128, BLOCK_D=128, BLOCK_N=64,
                NEED_DMASK=False, HAS_SOFTCAP=False, HAS_SINKS=False, NEW_KV=False, ROPE=False, ROT=0,
                PAGE_TILES=True,
                EMULATE_RNE=False, UPCAST=False, IEEE=False, PDL=True)
    kernel = attn._decode_kernel
    sig = _decode_signature(kernel)
    sig = {k: v for k, v in sig.items() if k in kernel.arg_names}
    variants = {"plain": {}, "rope+new_kv": dict(NEW_KV=True, ROPE=True, ROT=128)}
    for extra in sys.argv[1:]:
        key, _, value = extra.partition("=")
        base[key] = int(value) if value.isdigit() else value == "True"
    for name, over in variants.items():
        cfg = {**base, **over}
        cfg = {k: v for k, v in cfg.items() if k in kernel.arg_names}
        r = resources(kernel, sig, cfg)
        print(f"_decode_kernel {name:12s} {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
