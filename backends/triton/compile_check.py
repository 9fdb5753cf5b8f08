"""Compile the Triton backend's kernels for sm_90 without a GPU: whether they compile, and their registers, spills
and shared memory.

The interpreter (how the tests run the kernels on CPU) checks what a kernel computes, not whether it compiles:
it accepts code the compiler refuses (two returns of different types, an fp8 dot shape the MMA lowering lacks)
and cannot show register pressure. Triton's bundled ptxas and cuobjdump can, with no GPU and no device time.
Each case is a kernel with the constexprs and launch options its launcher picks for a representative shape;
pointers and strides are marked 16-divisible, as launches specialise them (without that Triton cannot prove
alignment, does not vectorise, and every kernel looks register-bound).

Run it with the interpreter off: ``python -m autodeploy.backends.triton.compile_check [--cases PATTERN]
[--json out.json]`` (``benchmarks/kernel_resources.py`` runs it too); ``tests/test_compile_check.py`` runs it in a
subprocess.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable, Optional

__all__ = ["resources", "CASES", "run"]

# name -> () -> (kernel, signature {arg: type}, constexprs, num_warps, num_stages, extra 16-divisible int args)
Case = Callable[[], tuple[Any, dict, dict, int, int, tuple]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn
    return register


def resources(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
              div16: tuple = (), capability: int = 90, exact_div16: bool = False, options: Optional[dict] = None) -> dict:
    """Compile ``fn`` (a ``@triton.jit`` function) for ``sm_<capability>``: {'regs', 'stack', 'smem', 'mma'}.
    ``stack`` > 0 means spills to local memory. 16-divisible: pointers, ``stride*`` and ``div16`` arguments, or
    (``exact_div16``, a recorded launch) exactly ``div16``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: ("constexpr" if name in constexprs else signature[name]) for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items()
             if name not in constexprs and (name in div16 or (not exact_div16 and (
                 ty.startswith("*") or name.startswith("stride"))))}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages, **(options or {})))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    reg, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return {"regs": int(reg.group(1)) if reg else -1, "stack": int(stack.group(1)) if stack else -1,
            "smem": k.metadata.shared, "mma": sorted(m for m in _MMAS if m + "." in sass),
            "loop": loop_summary(sass), "sass": sass}


_MMAS = ("HMMA", "HGMMA", "QGMMA", "IMMA", "IGMMA")
_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def loop_summary(sass: str) -> dict:
    """The largest innermost-looking loop of a SASS listing (a backward branch and the instructions it spans):
    its instruction count and the opcode classes in it (loads, MMAs, conversions, barriers), which is what a
    per-iteration cost is made of."""
    lines = [(int(m.group(1), 16), m.group(2), raw) for raw in sass.splitlines() if (m := _SASS_LINE.match(raw))]
    best: tuple[int, int] = (0, 0)
    addr_of_label, pending = {}, []
    for raw in sass.splitlines():  # a label's address is that of the next instruction
        m = re.match(r"^\s*\.L_x_(\d+):", raw)
        if m:
            pending.append(m.group(1))
            continue
        ins = _SASS_LINE.match(raw)
        if ins and pending:
            for lab in pending:
                addr_of_label[lab] = int(ins.group(1), 16)
            pending = []
    for addr, op, raw in lines:
        if not op.startswith("BRA"):
            continue
        target = re.search(r"\.L_x_(\d+)", raw)
        t = addr_of_label.get(target.group(1)) if target else None
        if t is None:
            hexed = re.search(r"BRA\s+0x([0-9a-f]+)", raw)
            t = int(hexed.group(1), 16) if hexed else None
        if t is not None and t < addr and addr - t > best[1] - best[0]:
            best = (t, addr)
    body = [op for addr, op, _ in lines if best[0] <= addr <= best[1]] if best[1] else []
    classes = {"instructions": len(body)}
    for name, prefixes in (("global_loads", ("LDG", "LDGSTS")), ("shared_loads", ("LDS", "LDSM")),
                           ("mma", _MMAS), ("conversions", ("F2F", "F2FP", "I2F", "F2I", "I2FP")),
                           ("barriers", ("BAR", "SYNCS", "WARPSYNC")), ("local", ("LDL", "STL"))):
        classes[name] = sum(1 for op in body if op.split(".")[0] in prefixes)
    return classes


# -- recorded launches: the launcher runs on CPU tensors and its kernel calls are captured, not launched ----------
class Launch:
    """One captured ``kernel[grid](...)`` call, specialised as Triton's launcher would specialise it (each
    argument through Triton's own ``native_specialize_impl``: its type, 16-divisibility, ints equal to 1 as
    constants), ready to compile offline."""

    def __init__(self, fn, args: tuple, kwargs: dict):
        import inspect

        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        names = set(fn.arg_names)
        bound = inspect.signature(fn.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
        bound.apply_defaults()
        self.fn = fn
        self.options = {k: v for k, v in kwargs.items() if k not in names}
        no_spec = {fn.arg_names[i] if isinstance(i, int) else i for i in (fn.do_not_specialize or ())}
        no_align = {fn.arg_names[i] if isinstance(i, int) else i
                    for i in (getattr(fn, "do_not_specialize_on_alignment", None) or ())}
        self.signature, self.constexprs, div16 = {}, {}, []
        for param in fn.params:
            value = bound.arguments[param.name]
            if param.is_constexpr:
                self.constexprs[param.name] = value
                continue
            ty, key = native_specialize_impl(BaseBackend, value, False, param.name not in no_spec,
                                             param.name not in no_align)
            if ty == "constexpr":  # None, or an int equal to 1
                self.constexprs[param.name] = key
            else:
                self.signature[param.name] = ty
                if key == "D":
                    div16.append(param.name)
        self.div16 = tuple(div16)

    def compile(self) -> dict:
        extra = {k: v for k, v in self.options.items() if k in ("maxnreg",)}
        return resources(self.fn, self.signature, self.constexprs, self.options.get("num_warps", 4),
                         self.options.get("num_stages", 3), self.div16, exact_div16=True, options=extra)


def record_launches(call: Callable[[], Any]) -> list[Launch]:
    """The Triton launches ``call()`` makes, captured instead of run (the interpreter must be off)."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    real = JITFunction.run

    def capture(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    JITFunction.run = capture
    try:
        call()
    finally:
        JITFunction.run = real
    return launches


def recorded(call: Callable[[], Any], kernel: str, index: int = 0) -> Launch:
    """The ``index``-th launch of the kernel named ``kernel`` that ``call()`` makes."""
    found = [launch for launch in record_launches(call) if launch.fn.fn.__name__ == kernel]
    if len(found) <= index:
        raise RuntimeError(f"the launcher made no launch {index} of {kernel}")
    return found[index]


# -- int8 weight-only GEMM --------------------------------------------------------------------------------------
def _int8_tiled(m: int, n: int, k: int, dtype: str, even_k: bool = True, bias: bool = False, w8a8: bool = False,
                config=None):
    from autodeploy.backends.triton.kernels.int8_gemm import _int8w_gemm_kernel, int8w_gemm_config

    bm, bn, bk, warps, stages, swap = config or int8w_gemm_config(m, n, k, 132, w8a8)
    sig = dict(x_ptr="*i8" if w8a8 else f"*{dtype}", xs_ptr="*fp32", w_ptr="*i8", s_ptr="*fp32", b_ptr=f"*{dtype}",
               y_ptr=f"*{dtype}", M="i32", N="i32", K="i32", stride_xm="i32", stride_wn="i32", stride_ym="i32")
    consts = dict(HAS_BIAS=bias, PER_CHANNEL=True, UPCAST=False, IEEE=False, EVEN_K=even_k, EMULATE_RNE=False,
                  W8A8=w8a8, ASM=True, SWAP=bool(swap), GROUP_M=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return _int8w_gemm_kernel, sig, consts, warps, stages, ("K",) if even_k else ()


for _m, _dt, _even in ((17, "bf16", True), (64, "fp16", False), (512, "bf16", True)):
    case(f"int8w_gemm/m{_m}/{_dt}{'' if _even else '/ragged_k'}")(
        lambda m=_m, dt=_dt, even=_even: _int8_tiled(m, 4096, 4096, dt, even, bias=not even))
for _even in (True, False):  # 65-128 rows: the swapped product (the converted weight as wgmma's register operand)
    case(f"int8w_gemm/m100/bf16/swap{'' if _even else '/ragged_k'}")(
        lambda even=_even: _int8_tiled(100, 4096, 4096, "bf16", even, bias=not even))
for _m, _even in ((17, True), (64, False), (512, True)):
    case(f"w8a8_gemm/m{_m}{'' if _even else '/ragged_k'}")(
        lambda m=_m, even=_even: _int8_tiled(m, 4096, 4096, "bf16", even, bias=True, w8a8=True))


# -- skinny quantized GEMMs (decode rows): the words forms (inline PTX) and the tensor-core form ------------------
def _words(fp8: bool):
    from autodeploy.backends.triton.kernels import quant_gemm as qg

    form, bn, bk, warps, stages = qg.quant_gemv_config(4096, 1, qg.quant.FP8_DTYPE if fp8 else qg.torch.int8, 4096)
    sig = dict(x_ptr="*i32" if fp8 else "*i64", xs_ptr="*fp32", w_ptr="*i32", ws_ptr="*fp32", b_ptr="*bf16",
               y_ptr="*bf16", N="i32", K4="i32", stride_wn="i32")
    consts = dict(BLOCK_N=bn, BLOCK_K4=bk // 4, HAS_BIAS=True, PER_CHANNEL=True, EVEN_K=True, PDL=True, ASM=True,
                  FP8=fp8)
    return qg._words_kernel, sig, consts, warps, stages, ("K4",)


def _w8a8_words():
    from autodeploy.backends.triton.kernels import quant_gemm as qg

    _, bn, bk, warps, stages = qg.quant_gemv_config(4096, 1, qg.torch.int8, 4096)
    sig = dict(xq_ptr="*i32", xs_ptr="*fp32", w_ptr="*i32", ws_ptr="*fp32", b_ptr="*bf16", y_ptr="*bf16", N="i32",
               K4="i32", stride_xm="i32", stride_wn="i32", stride_ym="i32")
    consts = dict(BLOCK_N=bn, BLOCK_K4=bk // 4, HAS_BIAS=True, PER_CHANNEL=True, EVEN_K=True, PDL=True, ASM=True)
    return qg._int8_w8a8_words_kernel, sig, consts, warps, stages, ("K4",)


def _gemv_tc(fp8: bool, m: int):
    from autodeploy.backends.triton.kernels import quant_gemm as qg

    dtype = qg.quant.FP8_DTYPE if fp8 else qg.torch.int8
    _, bn, bk, warps, stages = qg.quant_gemv_config(4096, m, dtype, 4096)
    sig = dict(a_ptr="*fp8e4nv" if fp8 else "*bf16", w_ptr="*fp8e4nv" if fp8 else "*i8", ws_ptr="*fp32",
               as_ptr="*fp32", b_ptr="*bf16", y_ptr="*bf16", M="i32", N="i32", K="i32", stride_am="i32",
               stride_wn="i32", stride_ym="i32")
    consts = dict(BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=False, A_MODE=qg.A_PREQUANTIZED if fp8 else qg.A_PLAIN,
                  PER_CHANNEL=True, PDL=True, UPCAST=False, IEEE=False)
    return qg._quant_gemv_dot_kernel, sig, consts, warps, stages, ("K",)


case("quant_gemv/words/fp8")(lambda: _words(True))
case("quant_gemv/words/int8-weight")(lambda: _words(False))
case("quant_gemv/words/w8a8-int8")(_w8a8_words)
case("quant_gemv/tc/fp8/m4")(lambda: _gemv_tc(True, 4))
case("quant_gemv/tc/int8-weight/m16")(lambda: _gemv_tc(False, 16))


# -- MoE experts (float, int8-weight, fp8) ----------------------------------------------------------------------
_MOE_DIV = ("H", "I", "sx_t", "sg_e", "sg_i", "su_e", "su_i", "sbg_e", "sbu_e", "s_inter", "sd_e", "sd_h", "sbd_e",
            "s_y")


def _moe(kernel_name: str, mode: str, block_m: int):
    import triton.language as tl

    from autodeploy.backends.triton.kernels import moe

    quant = moe._QUANT.get(mode, 0)
    act, w = {0: ("bf16", "bf16"), 1: ("bf16", "i8"), 2: ("u8", "u8"), 3: ("i8", "i8")}[quant]
    consts = dict(HAS_BIAS=True, OUT_TY=tl.bfloat16, UPCAST=False, IEEE=False, EMULATE_RNE=False, QUANT=quant,
                  BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64)
    if kernel_name == "gate_up":
        sig = {n: "i32" for n in "P E TOPK H I sx_t sg_e sg_i su_e su_i sbg_e sbu_e s_inter".split()}
        sig.update(x_ptr=f"*{act}", xs_ptr="*fp32", wg_ptr=f"*{w}", wu_ptr=f"*{w}", bg_ptr="*bf16", bu_ptr="*bf16",
                   wsg_ptr="*fp32", wsu_ptr="*fp32", inter_ptr="*bf16", row_pair_ptr="*i32", tile_expert_ptr="*i32",
                   alpha="fp32", limit="fp32")
        consts.update(ACT=0, sx_h=1, sg_h=1, su_h=1, sbg_i=1, sbu_i=1)  # unit strides specialise to constants
        kernel = moe._gate_up_kernel
    else:
        sig = {n: "i32" for n in "P E H I s_inter sd_e sd_h sbd_e s_y".split()}
        sig.update(inter_ptr=f"*{act}", is_ptr="*fp32", wd_ptr=f"*{w}", bd_ptr="*bf16", wsd_ptr="*fp32",
                   y_ptr="*bf16", row_pair_ptr="*i32", tile_expert_ptr="*i32")
        consts.update(sd_i=1, sbd_h=1)
        kernel = moe._down_kernel
    return kernel, sig, consts, 4, 3, _MOE_DIV


for _mode in ("float", "int8-weight", "fp8", "int8"):
    for _bm in (16, 64):  # mma.sync and warpgroup MMAs
        for _k in ("gate_up", "down"):
            case(f"moe/{_mode}/{_k}/m{_bm}")(lambda k=_k, mode=_mode, bm=_bm: _moe(k, mode, bm))


# -- decode attention (bf16 and fp8 KV pages) -------------------------------------------------------------------
def _decode(kv_fp8: bool, rope_new_kv: bool = False, merge: bool = False, short: bool = False):
    import torch

    from autodeploy.backends.triton.kernels import attention as attn

    kernel = attn._decode_kernel
    ints = {"qk_scale": "fp32", "softcap_scale": "fp32", "softcap_log2": "fp32"}
    ptrs = {"cu_seqlens_q": "*i32", "seq_lens_kv": "*i32", "page_table": "*i32", "work_ptr": "*i32",
            "split_start": "*i32", "slot_ptr": "*i64", "mid_o": "*fp32", "mid_lse": "*fp32", "sinks_ptr": "*fp32",
            "alibi_ptr": "*fp32", "tickets": "*i32"}
    if kv_fp8:
        ptrs.update(k_cache="*fp8e4nv", v_cache="*fp8e4nv", k_scale="*bf16", v_scale="*bf16")
    sig = {}
    for name in kernel.arg_names:
        if name.startswith("stride"):
            sig[name] = "i32"
        else:
            sig[name] = ints.get(name) or ptrs.get(name) or "*bf16"
    # the launch _decode_config picks on Hopper's shared memory (short: many sequences in a cache sized for them)
    block_n, warps, stages = attn._decode_config(128, torch.bfloat16, None, 256 if short else None,
                                                 64.0 if short else 0.0, kv_fp8, max_smem=228 * 1024)[:3]
    consts = dict(GROUP=4, BLOCK_H=16, PAGE_SIZE=64, HEAD_D=128, BLOCK_D=128, BLOCK_N=block_n, NEED_DMASK=False,
                  HAS_SOFTCAP=False, HAS_SINKS=False, HAS_ALIBI=False, NEW_KV=rope_new_kv, ROPE=rope_new_kv,
                  ROT=128 if rope_new_kv else 0,
                  PAGE_TILES=True, EMULATE_RNE=False, UPCAST=False, IEEE=False, PDL=True, KV_FP8=kv_fp8,
                  F16_DOT=kv_fp8, MERGE=merge)
    return kernel, sig, consts, warps, stages, ()


case("decode/bf16_kv")(lambda: _decode(False))
case("decode/fp8_kv")(lambda: _decode(True))
# the Triton backend's production decode: RoPE on q and the new key, the new token's cache write, in one launch
case("decode/bf16_kv/rope_new_kv")(lambda: _decode(False, True))
case("decode/fp8_kv/rope_new_kv")(lambda: _decode(True, True))
# many sequences: the last split item of a sequence merges its splits (ticket), no reduction launch
case("decode/bf16_kv/rope_new_kv/merge")(lambda: _decode(False, True, True))
case("decode/fp8_kv/rope_new_kv/merge")(lambda: _decode(True, True, True))
# large batches of short contexts, as the op launches them (new_token_mode "separate", merge by ticket): the
# cache already holds the new token; 2-warp programs
case("decode/bf16_kv/short")(lambda: _decode(False, False, True, short=True))
case("decode/fp8_kv/short")(lambda: _decode(True, False, True, short=True))


def _decode_blocks(kv_fp8: bool, config: Optional[tuple] = None):
    """The block decode kernel (each warp owning key blocks) at ``config`` (BLOCK_N, BLOCKS, warps, stages) or
    the one ``_blocks_config`` picks for page 64."""
    from autodeploy.backends.triton.kernels import attention as attn

    kernel = attn._decode_blocks_kernel
    ptrs = {"cu_seqlens_q": "*i32", "seq_lens_kv": "*i32", "page_table": "*i32", "work_ptr": "*i32",
            "split_start": "*i32", "mid_o": "*fp32", "mid_lse": "*fp32", "sinks_ptr": "*fp32", "alibi_ptr": "*fp32",
            "tickets": "*i32", "qk_scale": "fp32", "softcap_scale": "fp32", "softcap_log2": "fp32"}
    if kv_fp8:
        ptrs.update(k_cache="*fp8e4nv", v_cache="*fp8e4nv", k_scale="*bf16", v_scale="*bf16")
    sig = {name: "i32" if name.startswith("stride") else ptrs.get(name, "*bf16") for name in kernel.arg_names}
    block_n, blocks, warps, stages = config or attn._blocks_config(64)
    consts = dict(GROUP=4, BLOCK_H=16, PAGE_SIZE=64, HEAD_D=128, BLOCK_D=128, BLOCK_N=block_n, BLOCKS=blocks,
                  NEED_DMASK=False, HAS_SOFTCAP=False, HAS_SINKS=False, HAS_ALIBI=False, UPCAST=False, IEEE=False,
                  PDL=True, KV_FP8=kv_fp8, F16_DOT=kv_fp8, MERGE=True)
    return kernel, sig, consts, warps, stages, ()


# the block kernel (a complete cache, opt-in: AUTODEPLOY_DECODE_KERNEL=blocks) at its default config, and two
# of the alternatives the GPU sweep (run_gpu_pending.sh PART=blocks) times that do not spill (32- and 64-key
# blocks do: 80-700 B with Triton 3.9)
case("decode/bf16_kv/blocks")(lambda: _decode_blocks(False))
case("decode/fp8_kv/blocks")(lambda: _decode_blocks(True))
for _cfg in ((16, 4, 4, 4), (16, 8, 8, 3)):
    case("decode/fp8_kv/blocks/" + "_".join(map(str, _cfg)))(lambda c=_cfg: _decode_blocks(True, c))


def _decode_reduce(heads: int):
    from autodeploy.backends.triton.kernels import attention as attn

    sig = dict(mid_o="*fp32", mid_lse="*fp32", cu_seqlens_q="*i32", split_start="*i32", sinks_ptr="*bf16",
               out_ptr="*bf16", HQ="i32", stride_mow="i32", stride_moh="i32", stride_mlw="i32", stride_ot="i32",
               stride_oh="i32")
    consts = dict(HEAD_D=128, BLOCK_D=128, BLOCK_S=64, HEADS=heads, HAS_SINKS=False, PDL=True)
    return attn._decode_reduce_kernel, sig, consts, 4, 3, ()


case("decode/reduce")(lambda: _decode_reduce(1))
case("decode/reduce/heads8")(lambda: _decode_reduce(8))  # many sequences: several query heads per program


# -- FP8 producers: the quantizing norm and gated activation, the fused RoPE + FP8 KV-cache write ---------------
def _rms_norm_fp8():
    from autodeploy.backends.triton.kernels import rms_norm

    sig = dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", res_out_ptr="*bf16",
               q_ptr="*fp8e4nv", s_ptr="*fp32", stride_x="i32", stride_r="i32", stride_o="i32", stride_ro="i32",
               stride_q="i32", N="i32", eps="fp32")
    consts = dict(HAS_RES=True, HAS_W=True, BLOCK_N=4096, SINGLE_PASS=True, EMULATE_RNE=False, PDL=True, QUANT=True,
                  EMULATE_E4M3=False)
    return rms_norm._rms_norm_kernel, sig, consts, 16, 3, ("N",)


def _gated_act_fp8():
    from autodeploy.backends.triton.kernels import gated_act

    sig = dict(gate_ptr="*bf16", up_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32", stride_g="i32", stride_u="i32",
               stride_q="i32", N="i32")
    consts = dict(ACT=gated_act.ACTIVATIONS["silu"], BLOCK=4096, EMULATE_RNE=False, EMULATE_E4M3=False, PDL=True)
    return gated_act._gated_act_fp8_kernel, sig, consts, 4, 3, ("N",)


def _rope_cache_fp8():
    from autodeploy.backends.triton.kernels import rope_cache

    kernel = rope_cache._rope_cache_kernel
    ptrs = dict(slot_ptr="*i64", k_cache_ptr="*fp8e4nv", v_cache_ptr="*fp8e4nv", k_scale_ptr="*bf16",
                v_scale_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32")
    consts = dict(D=128, ROT=128, BLOCK_H=8, BLOCK_D=128, DO_Q=True, DO_KV=True, ROTATE_K=True, NEED_ROT=True,
                  EMULATE_RNE=False, KV_FP8=True)
    sig = {n: ("i32" if n.startswith("stride") or n in ("HQ", "HKV", "page_size") else ptrs.get(n, "*bf16"))
           for n in kernel.arg_names if n not in consts}
    return kernel, sig, consts, 4, 3, ()


case("fp8_producer/rms_norm")(_rms_norm_fp8)
case("fp8_producer/gated_act")(_gated_act_fp8)
case("fp8_producer/rope_cache_write")(_rope_cache_fp8)


# -- recorded from the launchers themselves (CPU tensors, launches captured): the token kernels, GEMV, norms,
# activations, row quantizers, the MoE combine, the decode partition and merge, prefill attention --------------
def _bf16(*shape):
    import torch

    return torch.randn(*shape).to(torch.bfloat16)


def _argmax():
    import torch

    from autodeploy.backends.triton.kernels.argmax import chunked_argmax  # (argmax_rows: torch off CUDA)

    return lambda: chunked_argmax(_bf16(8, 128256), row_sums=torch.empty(8))


def _sampling():
    import torch

    from autodeploy.backends.triton.kernels import sampling

    rows = [sampling.param_row(0.8, 200, 0.95, 0.05, seed, repetition_penalty=1.1) for seed in range(8)]
    params = sampling.pack_params(rows, list(range(8)), pen_rows=list(range(8)))
    return lambda: sampling.fused_sample(_bf16(8, 128256), params, row_sums=torch.empty(8),
                                         penalties=torch.zeros(8, 128256, dtype=torch.int32))


def _sampling_case():
    from autodeploy.backends.triton.kernels import sampling

    launch = recorded(_sampling(), "_sample_kernel")
    launch.constexprs["BLOCK"] = sampling._BLOCK  # the launcher's chunk on a GPU (off one, a wider one)
    return launch


def _gemv():
    from autodeploy.backends.triton.kernels.gemv import gemv

    return lambda: gemv(_bf16(1, 4096), _bf16(6144, 4096))


def _norm():
    from autodeploy.backends.triton.kernels.rms_norm import rms_norm

    return lambda: rms_norm(_bf16(4, 4096), _bf16(4096), 1e-5)


def _act():
    from autodeploy.backends.triton.kernels.gated_act import gated_act

    return lambda: gated_act(_bf16(4, 14336), _bf16(4, 14336))


def _rows_quant(kind: str):
    import torch

    from autodeploy.backends.triton.kernels import quant_gemm

    if kind == "fp8":
        return lambda: quant_gemm.quantize_fp8_rows(_bf16(16, 4096))
    return lambda: quant_gemm.quantize_int8_rows(_bf16(16, 4096), torch.rand(4096) + 0.5)


def _moe_combine():
    import torch

    from autodeploy.backends.triton.kernels.moe import fused_moe

    ids = torch.stack([torch.randperm(8)[:2] for _ in range(16)])
    return lambda: fused_moe(_bf16(16, 4096), ids, torch.rand(16, 2), _bf16(8, 1024, 4096), _bf16(8, 1024, 4096),
                             _bf16(8, 4096, 1024))


def _partition():
    import torch

    from autodeploy.backends.triton.kernels.decode_partition import decode_partition_kernel

    lens = torch.randint(1, 4096, (64,), dtype=torch.int32)
    cu = torch.arange(65, dtype=torch.int32)
    return lambda: decode_partition_kernel(lens, cu, target=33, window=0, align=64, min_chunk=0)


def _context(kv_fp8: bool):
    import torch

    from autodeploy.backends.triton.kernels.attention import context_attention
    from autodeploy.ops.kv_quant import FP8_KV_DTYPE, KV_SCALE_DTYPE

    pages, page, hkv, d = 64, 64, 8, 128
    kv = (torch.empty(pages, page, hkv, d, dtype=FP8_KV_DTYPE) if kv_fp8 else _bf16(pages, page, hkv, d))
    scales = dict(k_scale=torch.ones(pages, page, hkv, dtype=KV_SCALE_DTYPE),
                  v_scale=torch.ones(pages, page, hkv, dtype=KV_SCALE_DTYPE)) if kv_fp8 else {}
    q = _bf16(512, 32, d)
    cu = torch.tensor([0, 256, 512], dtype=torch.int32)
    return lambda: context_attention(q, kv, kv.clone(), cu, torch.tensor([300, 256], dtype=torch.int32),
                                     torch.arange(64, dtype=torch.int32).reshape(2, 32), torch.empty_like(q),
                                     num_seqs=2, scale=d ** -0.5, sliding_window=None, logit_softcap=None,
                                     sinks=None, **scales)


for _name, _make, _kernel in (
        ("tokens/argmax_chunks", _argmax, "_chunk_argmax_kernel"), ("tokens/argmax_merge", _argmax, "_merge_argmax_kernel"),
        ("gemv/bf16_row", _gemv, "_gemv_kernel"),
        ("norm/rms_norm", _norm, "_rms_norm_kernel"), ("act/gated_silu", _act, "_gated_act_kernel"),
        ("quant_rows/fp8", lambda: _rows_quant("fp8"), "_fp8_rows_kernel"),
        ("quant_rows/int8_smooth", lambda: _rows_quant("int8"), "_int8_rows_kernel"),
        ("moe/combine", _moe_combine, "_combine_kernel"),
        ("decode/partition", _partition, "_decode_partition_kernel"),
        ("prefill/bf16_kv", lambda: _context(False), "_context_attn_kernel"),
        ("prefill/fp8_kv", lambda: _context(True), "_context_attn_kernel")):
    case(_name)(lambda make=_make, kernel=_kernel: recorded(make(), kernel))
case("tokens/sampling_penalties")(_sampling_case)


def run(patterns: list[str]) -> dict[str, dict]:
    """Compile the cases matching ``patterns`` (fnmatch; all when empty): name -> resources, or {'error'}."""
    os.environ.pop("TRITON_INTERPRET", None)
    out = {}
    for name, build in CASES.items():
        if patterns and not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        try:
            built = build()
            if isinstance(built, Launch):
                out[name] = built.compile()
            else:
                fn, sig, consts, warps, stages, div16 = built
                out[name] = resources(fn, sig, consts, warps, stages, div16)
        except Exception as exc:  # noqa: BLE001 - reported per case
            root = exc
            while root.__cause__ is not None:  # a CompilationError's own text is the source line; its cause says why
                root = root.__cause__
            lines = [line for line in str(root).strip().splitlines() if line.strip()] or [""]
            out[name] = {"error": f"{type(root).__name__}: {lines[-1][:300]}"}
    return out


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels must be real @triton.jit functions
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", __name__, *(argv if argv is not None else sys.argv[1:])],
                               env=env)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", action="append", default=[], help="fnmatch pattern of case names (repeatable)")
    p.add_argument("--json", default="")
    p.add_argument("--sass", default="", help="directory to write each case's SASS listing into")
    args = p.parse_args(argv)
    results = run(args.cases)
    for name, r in results.items():
        if "error" in r:
            print(f"{name:32s} {r['error']}")
            continue
        loop = r["loop"]
        print(f"{name:32s} regs {r['regs']:3d}  spill stack {r['stack']:5d} B  smem {r['smem']:6d} B  "
              f"{','.join(r['mma']) or '-':6s} loop {loop['instructions']:4d} instr (global loads "
              f"{loop['global_loads']}, shared loads {loop['shared_loads']}, mma {loop['mma']}, conversions "
              f"{loop['conversions']}, barriers {loop['barriers']})")
        if args.sass:
            os.makedirs(args.sass, exist_ok=True)
            with open(os.path.join(args.sass, name.replace("/", "_") + ".sass"), "w") as f:
                f.write(r["sass"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: {k: v for k, v in r.items() if k != "sass"} for name, r in results.items()}, f, indent=1)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
