"""Export: the symbolic per-size tables against the eager ones, ONNX (onnxruntime) and
torch.export programs against eager PyTorch at fixed and dynamic sizes, CLI errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import transnext
from transnext import TransNeXt
from transnext.cli import main
from transnext.models import geometry, symbolic_tables
from transnext.tools import export as ex

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def small(**kw) -> TransNeXt:
    """Published layout (sr 8/4/2/1, window 3), small widths, one block a stage."""
    args = dict(embed_dims=(8, 16, 16, 24), num_heads=(1, 2, 1, 2), depths=(1, 1, 1, 1),
                mlp_ratios=(2, 2, 2, 2), num_classes=5)
    args.update(kw)
    torch.manual_seed(0)
    m = TransNeXt(**args).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the default init, so zeros and ones hide nothing
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m


def _mlp_bias(plan, seed=0):
    """Any fixed function of the coordinates, spread by the plan (as the model does)."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(16, 2, generator=g), torch.randn(3, 16, generator=g)
    return geometry.expand_bias(torch.relu(plan.table @ w1.t()) @ w2.t(), plan)


@pytest.mark.parametrize("q_hw,k_hw,pre", [
    ((7, 9), (3, 4), (7, 7)), ((56, 56), (7, 7), (56, 56)), ((25, 83), (3, 10), (14, 14)),
    ((16, 16), (16, 16), (1, 1)), ((13, 5), (13, 5), (7, 7)), ((10, 10), (3, 3), (28, 28))])
def test_symbolic_bias_plan_equals_eager_extrapolate(q_hw, k_hw, pre):
    """Every (query, key) pair gets the same coordinate as in the eager plan: same bias,
    bit for bit."""
    eager = geometry.bias_plan(q_hw, k_hw, q_hw, k_hw, pre, "cpu")
    sym = symbolic_tables.bias_plan(q_hw, k_hw, q_hw, k_hw, pre, "cpu")
    assert torch.equal(_mlp_bias(sym), _mlp_bias(eager))


@pytest.mark.parametrize("q_hw,k_hw,q0_hw,k0_hw", [
    ((7, 9), (3, 4), (8, 8), (4, 4)), ((8, 8), (4, 4), (8, 8), (4, 4)),
    ((25, 13), (3, 3), (10, 10), (3, 3)), ((5, 20), (5, 20), (8, 8), (8, 8))])
def test_symbolic_bias_plan_equals_eager_interpolate(q_hw, k_hw, q0_hw, k0_hw):
    eager = geometry.bias_plan(q_hw, k_hw, q0_hw, k0_hw, (7, 7), "cpu")
    sym = symbolic_tables.bias_plan(q_hw, k_hw, q0_hw, k0_hw, (7, 7), "cpu", interpolate=True)
    assert torch.equal(sym.table, eager.table)
    torch.testing.assert_close(_mlp_bias(sym), _mlp_bias(eager), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hw,out", [((13, 17), (3, 4)), ((14, 14), (7, 7)), ((9, 5), (2, 5)),
                                    ((25, 83), (3, 10))])
def test_symbolic_pool_equals_eager(hw, out):
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    torch.testing.assert_close(symbolic_tables.adaptive_avg_pool(x, out),
                               F.adaptive_avg_pool2d(x, out), rtol=1e-12, atol=1e-12)


def test_min_dynamic_size():
    assert ex.min_dynamic_size(transnext.create_model("transnext_tiny")) == 61
    assert ex.min_dynamic_size(transnext.create_model("transnext_femto")) == 49
    assert ex.min_dynamic_size(transnext.create_model("transnext_tiny", fixed_pool_size=7)) == 33


def _ort_input_shape(path):
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


def test_onnx_fixed_size(tmp_path):
    m = small()
    res = ex.export_model(m, tmp_path / "m.onnx", "onnx", (40, 48))
    assert [c["size"] for c in res.checks] == [[40, 48]]
    assert res.worst_rel < 1e-4 and res.checks[0]["max_ref"] > 0
    assert _ort_input_shape(tmp_path / "m.onnx") == [1, 3, 40, 48]
    # the file holds the model (not a constant): another input, the same answer as PyTorch
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 40, 48)
    y = sess.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(y, m(x).numpy(), rtol=1e-4, atol=1e-5)


def _dynamic_export(case: str, out_dir: str) -> ex.ExportResult:
    """One dynamic export and its checks (run in a worker process of ``dynamic_exports``)."""
    torch.set_num_threads(1)
    out = Path(out_dir)
    if case == "onnx_classifier_extrapolate":
        return ex.export_model(small(), out / "d.onnx", "onnx", (64, 64), dynamic=True)
    if case == "onnx_features_interpolate_linear":
        net = small(num_classes=0, pos_bias="interpolate", img_size=64, fixed_pool_size=3)
        from timm.models._features import FeatureGetterNet
        backbone = FeatureGetterNet(net, out_indices=(0, 1, 2, 3)).eval()
        return ex.export_model(backbone, out / "f.onnx", "onnx", (64, 80), dynamic=True)
    if case == "exported_program_interpolate":
        m = small(pos_bias="interpolate", img_size=64)
        return ex.export_model(m, out / "m.pt2", "exported-program", (64, 64), dynamic=True)
    raise ValueError(case)


DYNAMIC_CASES = ("onnx_classifier_extrapolate", "onnx_features_interpolate_linear",
                 "exported_program_interpolate")


@pytest.fixture(scope="module")
def dynamic_exports(tmp_path_factory):
    """The three dynamic exports (tracing with symbolic sizes: half a minute each on one
    core), started together in worker processes of their own so that they share the
    cores; each test waits for its own result and checks it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(len(DYNAMIC_CASES),
                               mp_context=multiprocessing.get_context("spawn"))
    futures = {}
    for case in DYNAMIC_CASES:
        out = tmp_path_factory.mktemp(case)
        futures[case] = (pool.submit(_dynamic_export, case, str(out)), out)
    try:
        yield {case: (lambda f=f, out=out: (f.result(timeout=600), out))
               for case, (f, out) in futures.items()}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@pytest.mark.slow
def test_onnx_dynamic_classifier_extrapolate(dynamic_exports):
    res, out = dynamic_exports["onnx_classifier_extrapolate"]()
    assert res.path == out / "d.onnx" and res.path.is_file()
    assert [c["size"] for c in res.checks] == [[64, 64], [200, 333], [97, 61]]
    assert res.worst_rel < 1e-4, res.checks
    shape = _ort_input_shape(out / "d.onnx")
    assert shape[:2] == [1, 3] and all(isinstance(s, str) for s in shape[2:])


@pytest.mark.slow
def test_onnx_dynamic_features_only_interpolate_linear(dynamic_exports):
    """A features_only backbone (timm's wrapper), interpolate bias mode and linear mode in
    one dynamic file: four stage maps at every size."""
    res, out = dynamic_exports["onnx_features_interpolate_linear"]()
    assert res.min_size == 33
    assert [c["size"] for c in res.checks] == [[64, 80], [200, 333], [97, 61]]
    assert res.worst_rel < 1e-4, res.checks
    sess = ort.InferenceSession(str(out / "f.onnx"), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"image": np.random.randn(1, 3, 97, 61).astype(np.float32)})
    assert [o.shape for o in outs] == [(1, 8, 25, 16), (1, 16, 13, 8), (1, 16, 7, 4),
                                       (1, 24, 4, 2)]


@pytest.mark.slow
def test_exported_program_dynamic_interpolate(dynamic_exports):
    res, out = dynamic_exports["exported_program_interpolate"]()
    assert res.path == out / "m.pt2" and res.path.is_file()
    assert len(res.checks) == 3 and res.worst_rel < 1e-4, res.checks


def test_export_cli_femto(tmp_path, capsys):
    out = tmp_path / "femto.pt2"
    rc = main(["export", "--model", "transnext_femto", "--format", "exported-program",
               "--input-size", "56", "64", "--in-chans", "1", "--output", str(out),
               "--time", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "check 56x64: largest difference" in text and "latency 56x64" in text


@pytest.mark.parametrize("argv,needle", [
    (["--model", "transnext_femto", "--format", "onnx", "--dynamic", "--input-size", "32", "32"],
     "needs both sides >= 49"),
    (["--model", "transnext_femto", "--format", "onnx", "--pos-bias", "interpolate"],
     "--pos-bias interpolate needs --img-size"),
    (["--model", "convnext_atto", "--format", "onnx", "--fixed-pool-size", "7"],
     "TransNeXt options"),
])
def test_export_cli_errors(tmp_path, capsys, argv, needle):
    rc = main(["export", *argv, "--output", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.onnx").exists()


def test_export_cli_bad_flags(tmp_path, capsys):
    for argv, needle in ((["--format", "tflite"], "invalid choice"),
                         (["--format", "onnx", "--input-size", "0", "5"], "1 or more"),
                         (["--format", "onnx", "--output", str(tmp_path)], "folder"),
                         (["--model", "transnext_nope"], "unknown model")):
        argv = ["--model", "transnext_femto", "--format", "onnx",
                "--output", str(tmp_path / "x.onnx")] + argv  # the later flag wins
        with pytest.raises(SystemExit) as e:
            main(["export", *argv])
        assert e.value.code == 2 and needle in capsys.readouterr().err
    rc = main(["export", "--model", "transnext_femto", "--format", "onnx", "--input-size",
               "64", "64", "64", "--output", str(tmp_path / "x.onnx")])
    assert rc == 2 and "takes S or H W" in capsys.readouterr().err
