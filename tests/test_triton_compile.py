"""Every Triton kernel of the package compiles for an H100 (sm_90), here, without a GPU.

The CPU tests run the kernels in Triton's interpreter, which accepts Python the compiler
rejects (and never types pointers or constexprs); this compiles each kernel to a cubin with
the launch-time constexprs of its real configurations, as ``triton.jit`` would on the GPU.
Skipped where this Triton has no NVIDIA backend (its bundled ptxas).
"""
from __future__ import annotations

import inspect
import os

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

# Where an earlier test module imported triton with its interpreter (TRITON_INTERPRET=1),
# triton.language's functions are the interpreter's and the compiler fails on them; the
# cases then run in a child process without it (test_compile_in_subprocess).
_CHILD = "TRANSNEXT_TRITON_COMPILE_TEST_CHILD"
INTERPRETING = type(tl.sum).__name__ == "InterpretedFunction"
here = pytest.mark.skipif(INTERPRETING, reason="triton's interpreter is active in this "
                          "process; test_compile_in_subprocess runs these")


def _target():
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:  # pragma: no cover - a Triton without the NVIDIA backend
        pytest.skip(f"no NVIDIA backend in this Triton: {e}")
    return GPUTarget("cuda", 90, 32)


def _compile(fn, consts: dict, types: dict):
    """Compile ``fn`` (a plain kernel function of the package). ``types`` names argument
    types; else arguments before the first lower-case one (the strides) are fp32 pointers,
    the rest int32 scalars or, annotated, constexprs taken from ``consts``."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    sig, cst, pointers = {}, {}, True
    for i, (name, p) in enumerate(inspect.signature(fn).parameters.items()):
        if p.annotation in (tl.constexpr, "tl.constexpr"):
            sig[name] = "constexpr"
            cst[(i,)] = consts[name]
            continue
        pointers = pointers and not name.islower()
        sig[name] = types.get(name, "*fp32" if pointers else "i32")
    assert set(consts) == {n for n, t in sig.items() if t == "constexpr"}, fn.__name__
    # JITFunction, not triton.jit: under TRITON_INTERPRET=1 (set by the kernels' CPU tests in
    # this process) triton.jit hands back the interpreter
    src = ASTSource(fn=JITFunction(fn), signature=sig, constexprs=cst)
    return triton.compile(src, target=_target())


def _attention_cases():
    from transnext.ops import triton_kernels as tk

    for dtype in ("bf16", "fp32"):
        act = {n: f"*{dtype}" for n in ("Q", "K", "V", "KP", "VP", "OUT", "ORES", "DO", "DQ",
                                        "DK", "DV", "DKP", "DVP")}
        act["PBI"] = "*i32"
        f32 = dtype == "fp32"
        common = dict(HEAD_D=24, D=32, WIN=3, IS_F32=f32, PREC="ieee" if f32 else "tf32",
                      ALIGN=8)
        for jt, has_w in ((0, False), (1, False), (4, True)):  # dense, factored (J taps)
            fk = dict(JT=jt, HAS_W=has_w)
            t = tk.TUNE
            yield f"fwd-{dtype}-J{jt}", tk._fwd_kernel, dict(
                common, WWP=16, BLOCK_N=t["fwd"]["BLOCK_N"], BLOCK_P=t["fwd"]["BLOCK_P"],
                SAVE_RES=not f32, **fk), act
            # whole, and the pooled half of the split (TUNE["bwd_q_split_min_p"])
            for e, local in (("bwd_q", True), ("bwd_q_pool", False)):
                yield f"{e}-{dtype}-J{jt}", tk._bwd_q_kernel, dict(
                    common, WWP=16, BLOCK_N=t[e]["BLOCK_N"], BLOCK_P=t[e]["BLOCK_P"],
                    ONE_PB=False, SAVE_RES=not f32, EXCL=jt == 0, LOCAL=local, POOL=True,
                    **fk), act
            yield f"bwd_kv_pool-{dtype}-J{jt}", tk._bwd_kv_pool_kernel, dict(
                common, BLOCK_N=t["bwd_kv_pool"]["BLOCK_N"],
                BLOCK_P=t["bwd_kv_pool"]["BLOCK_P"], SPLIT=1 if jt else 4, **fk), act
        yield f"bwd_q_local-{dtype}", tk._bwd_q_kernel, dict(
            common, WWP=16, BLOCK_N=t["bwd_q_local"]["BLOCK_N"], BLOCK_P=32, ONE_PB=False,
            SAVE_RES=not f32, EXCL=False, JT=0, HAS_W=False, LOCAL=True, POOL=False), act
        yield f"bwd_kv_local-{dtype}", tk._bwd_kv_local_kernel, dict(
            HEAD_D=24, D=32, WIN=3, BLOCK_N=tk.TUNE["bwd_kv_local"]["BLOCK_N"], ALIGN=8), act


def _bias_cases():
    from transnext.ops import position_bias_triton as pb

    idx = {"IDX": "*i32", "PTR": "*i32", "PAIR": "*i32", "ROWS": "i32", "U": "i32", "C": "i32"}
    for j, has_w in ((1, False), (4, True)):
        yield f"expand-J{j}", pb._expand_kernel, dict(J=j, HAS_W=has_w, HKP=32, WKP=64), idx
        for grad in (False, True):
            rb, cb = pb.SPREAD_BLOCK
            yield f"spread-J{j}-grad{int(grad)}", pb._spread_kernel, dict(
                J=j, HAS_W=has_w, GRAD=grad, RB=rb, CB=cb), idx
    yield "reduce", pb._reduce_kernel, dict(HAS_W=True, BLOCK=pb.BLOCK_C), idx


def _msda_cases():
    from transnext.ops import msda_triton as ms

    for dtype in ("bf16", "fp32"):
        t = {n: f"*{dtype}" for n in ("V", "LOC", "AW", "OUT", "DOUT", "DLOC", "DAW")}
        t.update(SHAPES="*i64", STARTS="*i64")
        shape = dict(L=4, P=4, HEAD_D=32, D=32, BLOCK_R=32)
        yield f"msda_fwd-{dtype}", ms._fwd_kernel, shape, t
        yield f"msda_bwd-{dtype}", ms._bwd_kernel, dict(shape, NEED_DV=True, NEED_DLA=True), t


def _layer_norm_cases():
    from transnext.ops import layer_norm as ln

    for width in (72, 576):  # TransNeXt-Tiny's narrowest and widest
        t = ln.TUNING
        fm, fc = ln._blocks(width, t["fwd_tile"])
        bm, bc = ln._blocks(width, t["bwd_tile"])
        types = {"M": "i32", "C": "i32", "eps": "fp32", "Y": "*bf16", "DY": "*bf16",
                 "DY2": "*bf16"}
        yield f"ln_fwd-{width}", ln._ln_fwd_kernel, dict(BLOCK_M=fm, BLOCK_C=fc), types
        for two in (False, True):
            yield f"ln_bwd-{width}-two{int(two)}", ln._ln_bwd_kernel, dict(
                BLOCK_M=bm, BLOCK_C=bc, TWO=two), types


def _gated_gelu_cases():
    from transnext.ops import gated_gelu as gg

    for dtype in ("bf16", "fp32"):
        t = {n: f"*{dtype}" for n in ("C", "V", "OUT", "G", "DC", "DV")}
        for bias in (False, True):  # with the depthwise conv's bias (fp32)
            yield f"glu_fwd-{dtype}-bias{int(bias)}", gg._glu_fwd_kernel, dict(
                HAS_BIAS=bias, BLOCK=gg.BLOCK), t
            yield f"glu_bwd-{dtype}-bias{int(bias)}", gg._glu_bwd_kernel, dict(
                HAS_BIAS=bias, BLOCK=gg.BLOCK), t


def _column_sum_cases():
    from transnext.ops import column_sum as cs

    for dtype in ("bf16", "fp32"):
        for width in (72, 1152):  # one and several column blocks
            bn = min(256, triton.next_power_of_2(width))
            yield f"colsum-{dtype}-{width}", cs._colsum_kernel, dict(
                BLOCK_M=cs.TUNING["tile"] // bn, BLOCK_N=bn), {"G": f"*{dtype}", "M": "i32",
                                                              "N": "i32"}


CASES = [*_attention_cases(), *_bias_cases(), *_msda_cases(), *_layer_norm_cases(),
         *_gated_gelu_cases(), *_column_sum_cases()]


@here
@pytest.mark.parametrize("name,fn,consts,types", CASES, ids=[c[0] for c in CASES])
def test_kernel_compiles_for_sm90(name, fn, consts, types):
    k = _compile(fn, consts, types)
    ptx = k.asm["ptx"]
    assert ".target sm_90" in ptx and k.asm["cubin"], name
    if name.startswith(("bwd_q", "spread-J4-grad1")):  # their gradients are fp32 atomics
        assert "red.global" in ptx or "atom.global" in ptx, name


@here
def test_compile_check_rejects_what_the_compiler_rejects():
    """The check is real: a kernel that does not type (a pointer stored as a value) fails,
    the same kernel without that line compiles."""
    from triton.compiler.errors import CompilationError

    def good(X, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(X + offs, (offs < N).to(tl.float32))

    def bad(X, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(X + offs, (offs < N).to(tl.float32))
        tl.store(X + N, X)

    _compile(good, dict(BLOCK=16), {"N": "i32"})
    with pytest.raises(CompilationError):
        _compile(bad, dict(BLOCK=16), {"N": "i32"})


@pytest.mark.skipif(not INTERPRETING or os.environ.get(_CHILD) == "1",
                    reason="the cases run in this process")
def test_compile_in_subprocess():
    _target()  # skips where this Triton has no NVIDIA backend
    from triton_env import run_in_interpreter

    run_in_interpreter(__file__, _CHILD, interpret=False)
