"""Whole model: TRANSNEXT_ATTN_BACKEND=triton gives the reference's logits and gradients.

On the CPU the Triton kernels run in triton's interpreter, which must be chosen
before triton is imported, so the comparison runs in a fresh subprocess (this
file run as a script). On CUDA it also runs in-process at a real size.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


def _model_and_input(device: str, size: tuple[int, int], batch: int, seed: int = 0):
    from transnext.models.transnext import TransNeXt

    torch.manual_seed(seed)
    # Small but complete: aggregated stages with several pool sizes, odd map sizes,
    # and the full-attention last stage.
    model = TransNeXt(in_chans=3, num_classes=7, embed_dims=(24, 48, 96, 192),
                      num_heads=(1, 2, 4, 8), depths=(1, 1, 2, 1), mlp_ratios=(2, 2, 2, 2),
                      sr_ratios=(4, 2, 2, 1), pretrain_size=64).to(device)
    # Default init leaves some attention parameters near zero; randomise them all.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("query_embedding", "learnable", "relative_pos",
                                       "temperature")):
                p.normal_(0.0, 0.5)
    return model, torch.randn(batch, 3, *size, device=device)


def compare_backends(device: str, size: tuple[int, int], batch: int, dtype=torch.float32,
                     seed: int = 0) -> dict:
    """Max relative errors (logits, worst parameter gradient) of triton vs reference, and
    ``infer_logits``: the same for a forward without autograd (eval mode; where the pool
    bias form may differ from training's)."""
    from transnext.ops.aggregated_attention import attention_backend
    from transnext.tools.backend_check import compare_backends as compare

    model, x = _model_and_input(device, size, batch, seed)
    err = compare(model, x, "triton", None if dtype == torch.float32 else dtype)
    model.eval()
    logits = {}
    with torch.no_grad():
        for backend in ("reference", "triton"):
            with attention_backend(backend):
                logits[backend] = model(x).double()
    ref = logits["reference"]
    err["infer_logits"] = ((logits["triton"] - ref).norm() / ref.norm()).item()
    return err


CHILD_CASES = {"dense": ("dense", ()), "factored": ("factored", ()),
               "auto-large": ("auto", ("--no-dense-cache",))}


def _start_child(pool_bias: str, args, log_dir) -> tuple:
    env = dict(os.environ, TRITON_INTERPRET="1", TRANSNEXT_POOL_BIAS=pool_bias)
    env.pop("TRANSNEXT_ATTN_BACKEND", None)
    out, err = log_dir / f"{pool_bias}{len(args)}.out", log_dir / f"{pool_bias}{len(args)}.err"
    with open(out, "w") as fo, open(err, "w") as fe:  # files: no child waits on a reader
        proc = subprocess.Popen([sys.executable, __file__, *args], env=env, stdout=fo,
                                stderr=fe)
    return proc, out, err


def _child_result(child) -> dict:
    proc, out, err = child
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.read_text()[-3000:]
    return json.loads(out.read_text().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreter_children(tmp_path_factory):
    """The three CPU-interpreter comparisons, started together (each a single-threaded
    process: they share the cores instead of queueing); each test reads its own."""
    pytest.importorskip("triton")
    from triton_env import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem())
    log_dir = tmp_path_factory.mktemp("backend_children")
    children = {k: _start_child(pb, args, log_dir) for k, (pb, args) in CHILD_CASES.items()}
    yield children
    for proc, _, _ in children.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("case", list(CHILD_CASES))
def test_whole_model_triton_matches_reference_cpu_interpreter(case, interpreter_children):
    """Both forms of the pool bias the kernels read (ops.position_bias), every stage kind,
    training and inference; ``auto-large``: inference at sizes whose dense bias is too large
    to cache (DENSE_CACHE_MAX_BYTES set to 0) reads the factored one."""
    pool_bias = CHILD_CASES[case][0]
    err = _child_result(interpreter_children[case])
    assert err["logits"] < 1e-4, err
    assert err["grad"] < 1e-3, err
    assert err["infer_logits"] < 1e-4, err
    assert err["infer_factored"] == (pool_bias != "dense"), err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pool_bias", ["dense", "factored"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 3e-2)])
def test_whole_model_triton_matches_reference_cuda(dtype, tol, pool_bias, monkeypatch):
    monkeypatch.setenv("TRANSNEXT_POOL_BIAS", pool_bias)
    err = compare_backends("cuda", (224, 224), 4, dtype)
    assert err["logits"] < tol and err["grad"] < tol and err["infer_logits"] < tol, err


def test_pool_bias_form_env_is_checked(monkeypatch):
    from transnext.models.transnext import _factored

    monkeypatch.setenv("TRANSNEXT_POOL_BIAS", "sparse")
    with pytest.raises(ValueError, match="TRANSNEXT_POOL_BIAS='sparse'"):
        _factored("triton")
    monkeypatch.setenv("TRANSNEXT_POOL_BIAS", "factored")
    assert _factored("triton") and not _factored("reference")


def test_auto_pool_bias_form(monkeypatch):
    """auto: factored with autograd or under torch.compile; in inference dense up to
    DENSE_CACHE_MAX_BYTES."""
    from transnext.models.transnext import DENSE_CACHE_MAX_BYTES, _factored

    monkeypatch.delenv("TRANSNEXT_POOL_BIAS", raising=False)
    big = DENSE_CACHE_MAX_BYTES + 1
    with torch.enable_grad():
        assert _factored("triton") and _factored("triton", big)
    with torch.no_grad():
        assert not _factored("triton") and not _factored("triton", DENSE_CACHE_MAX_BYTES)
        assert _factored("triton", big) and not _factored("reference", big)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert _factored("triton")  # no bias cache under torch.compile
        monkeypatch.setenv("TRANSNEXT_POOL_BIAS", "dense")
        assert not _factored("triton", big)


class _EnvScaled(torch.nn.Module):
    """Its output depends on the selected backend: a stand-in for a broken backend."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        scale = 1.5 if os.environ.get("TRANSNEXT_ATTN_BACKEND") == "triton" else 1.0
        return x * self.w * scale


def test_backend_check_reports_a_disagreeing_backend_and_restores_the_env(monkeypatch):
    from transnext.tools.backend_check import compare_backends as compare

    monkeypatch.setenv("TRANSNEXT_ATTN_BACKEND", "auto")
    err = compare(_EnvScaled(), torch.ones(2, 3), "triton")
    assert err["logits"] == pytest.approx(0.5) and err["grad"] == pytest.approx(1.25)
    assert err["worst_param"] == "w"
    assert os.environ["TRANSNEXT_ATTN_BACKEND"] == "auto"
    same = compare(_EnvScaled(), torch.ones(2, 3), "reference")
    assert same["logits"] == 0.0 and same["grad"] == 0.0
    # under autocast both are also measured against the fp32 reference
    amp = compare(_EnvScaled(), torch.ones(2, 3), "triton", torch.bfloat16)
    assert amp["vs_fp32"]["backend"]["logits"] == pytest.approx(0.5)
    assert amp["vs_fp32"]["reference"]["logits"] == 0.0  # autocast leaves a mul in fp32


if __name__ == "__main__":
    import transnext.models.transnext as tm

    torch.set_num_threads(1)
    if "--no-dense-cache" in sys.argv:
        tm.DENSE_CACHE_MAX_BYTES = 0
    forms = []  # the pool-bias form each block's inference forward chose
    real = tm._factored
    tm._factored = lambda *a: forms.append(real(*a)) or forms[-1]
    result = compare_backends("cpu", (37, 45), 2)
    from transnext.ops.aggregated_attention import attention_backend

    with attention_backend("triton"), torch.no_grad():
        forms.clear()
        _model_and_input("cpu", (37, 45), 2)[0].eval()(torch.randn(1, 3, 37, 45))
    result["infer_factored"] = all(forms) if forms else None
    print(json.dumps(result))
