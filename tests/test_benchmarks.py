"""The benchmark scripts run end to end (on the CPU, tiny sizes) and write what they promise.

Every script run is a process of its own with one thread. The module starts them all in
the background when its first test asks (``bench``): two at a time, and the UperNet run,
which takes several GB, on its own after the others. Each test waits for its own run and
checks what it printed and wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict | None = None) -> str:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def _runs(d: Path) -> dict[str, tuple[list[str], bool]]:
    """name -> (script and arguments, whether it needs triton's interpreter); every file
    a run writes goes under ``d``, named after the run."""
    # the dense heads: tiny runs (no warm-up step, one image per detector batch; UperNet's
    # BatchNorm needs two and its size is fixed at 512)
    dense = ["--models", "transnext_micro", "convnext_atto", "--iters", "1", "--repeats", "1",
             "--warmup", "0"]
    det = ["--size", "64", "96", "--instances", "2", "--batch", "1"]
    return {
        "model": (["benchmarks/bench_model.py", "--device", "cpu", "--models", "transnext_micro",
                   "convnext_tiny", "--sizes", "32", "--batch", "2", "--warmup", "1",
                   "--iters", "1", "--repeats", "1", "--out", str(d / "model.json")], False),
        "model_failing": (["benchmarks/bench_model.py", "--device", "cpu", "--models",
                           "transnext_femto", "--sizes", "32", "--batch", "1", "--warmup", "1",
                           "--iters", "1", "--repeats", "1",
                           "--out", str(d / "model_failing.json")], False),
        "profile": (["benchmarks/profile_model.py", "--model", "transnext_micro", "--batch", "1",
                     "--size", "32", "--rows", "5", "--out", str(d / "profile.txt")], False),
        "model_check": (["benchmarks/bench_model.py", "--device", "cpu", "--models",
                         "transnext_micro", "--sizes", "32", "--batch", "1", "--warmup", "1",
                         "--iters", "1", "--repeats", "1", "--check",
                         "--out", str(d / "model_check.json")], True),
        "dense": (["benchmarks/bench_dense.py", "--device", "cpu", "--models", "transnext_micro",
                   "--baselines", "convnext_tiny", "swin_tiny_patch4_window7_224",
                   "--shapes", "40x72:1", "--modes", "infer", "--warmup", "1", "--iters", "1",
                   "--repeats", "1", "--out", str(d / "dense.json")], False),
        "dense_graphs": (["benchmarks/bench_dense.py", "--device", "cpu", "--models",
                          "transnext_micro", "--variants", "extrap", "--baselines",
                          "convnext_tiny", "--shapes", "32x32:1", "--modes", "train",
                          "--compile", "eager", "graphs", "--warmup", "1", "--iters", "1",
                          "--repeats", "1", "--out", str(d / "dense_graphs.json")], False),
        "floor": (["benchmarks/bench_dense.py", "--device", "cpu", "--models", "transnext_micro",
                   "--baselines", "convnext_tiny", "--variants", "extrap", "--floor",
                   "--costs", "--shapes", "40x72:1", "--modes", "train", "--warmup", "1",
                   "--iters", "2", "--repeats", "1", "--out", str(d / "floor.json")], False),
        "kernel_tune": (["benchmarks/bench_dense.py", "--device", "cpu", "--models",
                         "transnext_micro", "--variants", "extrap", "--shapes", "32x32:1",
                         "--modes", "infer", "--profile", str(d / "kernel_tune.txt"),
                         "--profile-rows", "5", "--kernel-tune", 'fwd={"num_stages": 3}'],
                        False),
        "det": (["benchmarks/bench_det.py", "--device", "cpu", *dense, *det,
                 "--infer-shapes", "2", "--out", str(d / "det.json")], False),
        "dino": (["benchmarks/bench_det.py", "--device", "cpu", *dense, "--arch", "dino-4scale",
                  *det, "--queries", "20", "--out", str(d / "dino.json")], False),
        "seg": (["benchmarks/bench_seg.py", "--device", "cpu", *dense, "--batch", "2",
                 "--crop", "128", "--out", str(d / "seg.json")], False),
        "bias_forms": (["benchmarks/bench_bias_forms.py", "--device", "cpu", "--shapes",
                        "32x64:1:interpolate", "--iters", "1", "--repeats", "1",
                        "--out", str(d / "bias_forms.json")], True),
    }


# the light runs, two at a time, longest first (about 60 s down to 5 s of one core each);
# then the heavy ones, alone
LIGHT = ("model_check", "bias_forms", "profile", "det", "dino", "model", "floor",
         "dense_graphs", "seg", "dense", "kernel_tune", "model_failing")
HEAVY = ()  # none since the UperNet run's 128 crops (at 512: several GB, 84 s)


def _interpreter_ok() -> bool:
    """Whether the runs on triton's interpreter can start (their tests skip or fail
    otherwise, each with its own reason)."""
    try:
        import triton  # noqa: F401
        from triton_env import interpreter_problem
        return interpreter_problem() is None
    except Exception:
        return False


class _Runs:
    """The benchmark runs, started in a background thread; ``stdout(name)`` waits for one."""

    def __init__(self, d: Path):
        self.dir = d
        runs = _runs(d)
        assert set(runs) == set(LIGHT) | set(HEAVY)
        interp = _interpreter_ok()
        self._todo = {n: runs[n] for n in (*LIGHT, *HEAVY) if interp or not runs[n][1]}
        self._futures = {n: Future() for n in self._todo}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._schedule, daemon=True)
        self._thread.start()

    def _work(self, name: str) -> None:
        args, interp = self._todo[name]
        fut = self._futures[name]
        if self._stop.is_set():
            fut.set_exception(RuntimeError(f"benchmark run {name!r} not started"))
            return
        try:
            fut.set_result(_run(args, env=dict(os.environ, TRITON_INTERPRET="1")
                                if interp else None))
        except BaseException as e:  # noqa: BLE001  (the test that waits re-raises it)
            fut.set_exception(e)

    def _schedule(self) -> None:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(self._work, [n for n in LIGHT if n in self._todo]))
        for name in HEAVY:
            if name in self._todo:
                self._work(name)

    def stdout(self, name: str) -> str:
        return self._futures[name].result(timeout=1800)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    runs = _Runs(tmp_path_factory.mktemp("bench"))
    yield runs
    runs.close()


def test_bench_model_writes_rows_and_ratio(bench):
    stdout = bench.stdout("model")
    out = bench.dir / "model.json"
    data = json.loads(out.read_text())
    rows = {(r["model"], r["linears"]): r for r in data["rows"]}
    # TransNeXt twice on the CPU: PyTorch's Linear products and oneDNN's packed ones
    assert set(rows) == {("transnext_micro", "torch"), ("transnext_micro", "packed"),
                         ("convnext_tiny", "torch")}
    for r in rows.values():
        assert "error" not in r, r
        assert r["img_per_s"] > 0 and r["batch"] == 2 and r["size"] == 32
        assert r["compiled"] is False and r["peak_gib"] is None  # no CUDA memory on the CPU
    # the table gives each TransNeXt row's ratio to convnext_tiny measured in this run
    base = rows[("convnext_tiny", "torch")]["img_per_s"]
    for linears, label in (("torch", "| transnext_micro |"),
                           ("packed", "| transnext_micro (packed linears) |")):
        line = next(x for x in stdout.splitlines() if x.startswith(label))
        assert f"{rows[('transnext_micro', linears)]['img_per_s'] / base:.2f}x" in line


def test_bench_model_reports_a_failing_model_as_a_row(bench):
    bench.stdout("model_failing")
    out = bench.dir / "model_failing.json"
    rows = json.loads(out.read_text())["rows"]
    assert [r["linears"] for r in rows] == ["torch", "packed"]
    assert all("1 input channels" in r["error"] for r in rows)  # femto takes 1-channel images


def test_profile_model_writes_step_time_and_table(bench):
    bench.stdout("profile")
    out = bench.dir / "profile.txt"
    text = out.read_text()
    assert text.startswith("step: ") and "ms to enqueue on the host" in text
    assert "aten::" in text and "Self CPU" in text


def test_bench_model_check_compares_triton_with_reference(bench):
    """--check runs the Triton backend (interpreter on the CPU) against the reference."""
    pytest.importorskip("triton")
    from triton_env import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem())
    bench.stdout("model_check")
    out = bench.dir / "model_check.json"
    (check,) = json.loads(out.read_text())["checks"]
    assert check["ok"] and check["model"] == "transnext_micro"
    assert 0 < check["grad"] < 1e-3 and check["logits"] < 1e-4  # compared, and close


def test_bench_dense_rows_modes_and_ratio(bench):
    """Dense backbones: every bias mode of TransNeXt and the baselines (swin padded to a
    multiple of 32) in one table, with TransNeXt's time ratio to convnext_tiny."""
    stdout = bench.stdout("dense")
    out = bench.dir / "dense.json"
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"transnext_micro[interp@40]", "transnext_micro[extrap]",
                         "transnext_micro[linear]", "convnext_tiny",
                         "swin_tiny_patch4_window7_224"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["ms_per_step"] > 0 and (r["H"], r["W"], r["batch"]) == (40, 72, 1)
    base = rows["convnext_tiny"]["ms_per_step"]
    line = next(x for x in stdout.splitlines() if x.startswith("| transnext_micro[extrap]"))
    assert f"{base / rows['transnext_micro[extrap]']['ms_per_step']:.2f}x" in line


def test_bench_dense_graphs_rows_compare_with_graphs_rows(bench):
    """--compile eager graphs: each model once per mode, each ratio against convnext_tiny
    in the same mode (on the CPU the graphed wrapper runs eagerly: the table's logic)."""
    stdout = bench.stdout("dense_graphs")
    out = bench.dir / "dense_graphs.json"
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["how"]) for r in rows] == [
        ("transnext_micro[extrap]", "eager"), ("convnext_tiny", "eager"),
        ("transnext_micro[extrap]", "graphs"), ("convnext_tiny", "graphs")]
    assert all("error" not in r for r in rows)
    line = next(x for x in stdout.splitlines()
                if x.startswith("| transnext_micro[extrap]") and "| graphs |" in x)
    assert f"{rows[3]['ms_per_step'] / rows[2]['ms_per_step']:.2f}x" in line


def test_bench_dense_floor_skips_only_the_attention_op(bench):
    """--floor: a row whose aggregated-attention op is replaced, every other layer (the
    pooled branch and the bias MLP included) still trained; the real op comes back after."""
    import timm
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_dense
    finally:
        sys.path.pop(0)
    import transnext.models.transnext as tm

    torch = bench_dense.torch
    real = tm.aggregated_attention, tm.aggregated_attention_packed
    torch.manual_seed(0)
    model = timm.create_model("transnext_micro", features_only=True).train()
    x = torch.randn(1, 3, 64, 64)
    with bench_dense._attention_skipped(True):
        assert tm.aggregated_attention is not real[0]
        assert tm.aggregated_attention_packed is not real[1]
        skipped = model(x)
        sum(f.square().mean() for f in skipped).backward()
    assert (tm.aggregated_attention, tm.aggregated_attention_packed) == real
    names = {n: p for n, p in model.named_parameters()}
    for key in ("attn.kv.weight", "attn.sr.weight", "attn.norm.weight", "attn.cpb_fc1.weight",
                "attn.q.weight", "mlp.fc1.weight"):
        grads = [p.grad for n, p in names.items() if n.endswith(key) and "block1.0." in n]
        assert grads and grads[0] is not None, key
    assert not any(f.isnan().any() for f in skipped)
    with torch.no_grad():
        real_out = model(x)
    assert any(not torch.allclose(a, b) for a, b in zip(skipped, real_out))

    stdout = bench.stdout("floor")
    out = bench.dir / "floor.json"
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == [
        "transnext_micro[extrap]", "transnext_micro[extrap, attention op skipped]",
        "convnext_tiny"]
    assert "| transnext_micro[extrap, attention op skipped] |" in stdout
    # --costs: the host's enqueue time per step (no GPU here: no kernel time or count)
    assert "host ms | GPU ms | kernels |" in stdout
    for r in rows:
        assert r["host_ms"] > 0 and r["gpu_ms"] is None and r["kernels"] is None, r


def test_bench_dense_kernel_tune_and_inference_profile(bench):
    """--kernel-tune changes an entry of triton_kernels.TUNE for the run (merged, or removed
    with null) and refuses a malformed one; --profile with --modes infer profiles inference."""
    import copy

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_dense
    finally:
        sys.path.pop(0)
    from transnext.ops import triton_kernels as tk

    saved = copy.deepcopy(tk.TUNE)
    try:
        assert bench_dense._set_tune('fwd={"num_stages": 3}') == (
            "fwd", {**saved["fwd"], "num_stages": 3})
        assert bench_dense._set_tune("fwd_small=null") == ("fwd_small", None)
        assert "fwd_small" not in tk.TUNE
        with pytest.raises(ValueError, match="not ENTRY=JSON"):
            bench_dense._set_tune("fwd")
        with pytest.raises(ValueError, match="not JSON"):
            bench_dense._set_tune("fwd={num")
    finally:
        tk.TUNE.clear()
        tk.TUNE.update(saved)
    bench.stdout("kernel_tune")
    prof = bench.dir / "kernel_tune.txt"
    text = prof.read_text()
    assert "two inference steps" in text and "convolution" in text


def test_bench_det_and_seg_write_rows_and_ratios(bench):
    """The dense benchmarks (Mask R-CNN, DINO, UperNet) run both backbones under one head and
    report TransNeXt's ratio to the last model of the run."""
    for name in ("det", "dino", "seg"):
        stdout = bench.stdout(name)
        rows = json.loads((bench.dir / f"{name}.json").read_text())["rows"]
        assert [r["model"] for r in rows] == ["transnext_micro", "convnext_atto"]
        key = "train_img_s" if "train_img_s" in rows[1] else None
        ratio = rows[0]["train_ratio"]
        assert ratio > 0 and key and abs(ratio - rows[0][key] / rows[1][key]) < 1e-9
        line = next(x for x in stdout.splitlines() if x.startswith("| transnext_micro"))
        assert f"{ratio:.2f}" in line
    for r in json.loads((bench.dir / "det.json").read_text())["rows"]:  # --infer-shapes 2
        assert r["first_pass_ms_img"] > 0 and r["second_pass_ms_img"] > 0


def test_bench_bias_forms_times_each_form(bench):
    """The inference forward with the cached dense bias, the factored one written out per
    call and the one read by the kernel (interpreter on the CPU): all three give the same
    output, each is timed, the dense bias's size is reported."""
    pytest.importorskip("triton")
    from triton_env import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem())
    stdout = bench.stdout("bias_forms")
    out = bench.dir / "bias_forms.json"
    rows = json.loads(out.read_text())["rows"]
    assert [r["stage"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(r[f"{f}_ms"] > 0 and r[f"{f}_diff"] < 1e-3 for f in ("dense", "expand",
                                                                           "gather")), r
        assert r["dense_mib"] == r["heads"] * r["N"] * r["P"] * 4 / 2**20
    assert stdout.count("| 32x64 |") == 3
