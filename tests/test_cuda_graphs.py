"""engine.cuda_graphs: the eager step recorded in CUDA graphs (the jobs' --cuda-graphs).

On the CPU: the wrapper is transparent, the jobs refuse what graphs cannot do, and a table a
graph reads survives the cache's clear. On CUDA: graphed training steps and inference give
the eager model's numbers, follow in-place weight updates and leave other shapes eager."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import transnext  # noqa: F401  (registers the models)
from conftest import graphs_follow_eager
from transnext import tables
from transnext.cli import main
from transnext.engine.cuda_graphs import GraphedForward, check_cuda_graphs
from transnext.engine.errors import UserError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def kernels_as_recorded(monkeypatch):
    """The eager reference with the Triton kernels a recording runs (``TRANSNEXT_LAYER_NORM``
    and ``TRANSNEXT_GLU`` auto: the kernels while capturing, PyTorch's ops otherwise):
    graphs replay the eager step's kernels, and this compares exactly that.
    test_fused_kernels.py compares the kernels with PyTorch's ops."""
    monkeypatch.setenv("TRANSNEXT_LAYER_NORM", "triton")
    monkeypatch.setenv("TRANSNEXT_GLU", "triton")


def _backbone(device="cpu", **kw):
    torch.manual_seed(0)
    m = timm.create_model("transnext_micro", features_only=True, drop_path_rate=0.0, **kw)
    m = m.to(device)
    if device == "cuda":
        m = m.to(memory_format=torch.channels_last)
    return m


def _loss(feats):
    return sum(f.float().square().mean() for f in feats)


def test_on_cpu_the_wrapper_is_the_module():
    m = _backbone()
    net = GraphedForward(m)
    x = torch.randn(1, 3, 40, 56)
    a, b = _loss(net(x)), _loss(m(x))
    assert torch.equal(a, b)
    a.backward()
    ga = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    b.backward()
    for n, p in m.named_parameters():
        if p.grad is not None:
            assert torch.equal(ga[n], p.grad), n
    assert net.graphs == 0 and net.eager_calls == 0
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedForward(m, warmup=0)


def test_recording_is_thread_local_on_every_torch(monkeypatch):
    """Thread-local capture (NCCL's watchdog thread must not invalidate a recording under
    torchrun): a keyword where make_graphed_callables takes one, else torch.cuda.graph made
    thread-local for the call (torch 2.11's make_graphed_callables has no such keyword) and
    put back after it."""
    import inspect

    from transnext.engine import cuda_graphs as cg
    plain = torch.cuda.graph
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
        with cg._thread_local_capture() as kw:
            assert kw == {"capture_error_mode": "thread_local"} and torch.cuda.graph is plain

    def older(callables, sample_args, num_warmup_iters=3, allow_unused_input=False,
              pool=None):  # the signature torch 2.11 has
        raise AssertionError("not called")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", older)
    with cg._thread_local_capture() as kw:
        assert kw == {}
        made = torch.cuda.graph
        assert made is not plain and issubclass(made, plain)
        assert torch.cuda.graphs.graph is made
        default = inspect.signature(made.__init__).parameters["capture_error_mode"].default
        assert default == "thread_local"
    assert torch.cuda.graph is plain and torch.cuda.graphs.graph is plain


def test_preconditions_are_one_clear_error_each():
    gpu = torch.device("cuda", 0)
    with pytest.raises(UserError, match="needs a CUDA device"):
        check_cuda_graphs(torch.device("cpu"))
    with pytest.raises(UserError, match="--accum-steps 4"):
        check_cuda_graphs(gpu, accum_steps=4)
    with pytest.raises(UserError, match="choose one"):
        check_cuda_graphs(gpu, compiled=True)
    check_cuda_graphs(gpu)  # what remains is allowed, in one process or under torchrun


@pytest.mark.parametrize("command", [["train"], ["seg", "train"], ["det", "train"]])
def test_jobs_refuse_cuda_graphs_on_the_cpu_before_reading_data(command, tmp_path, capsys):
    rc = main([*command, "--model", "transnext_micro", "--data-dir", str(tmp_path),
               "--output", str(tmp_path / "o"), "--device", "cpu", "--cuda-graphs"])
    assert rc == 2
    assert "--cuda-graphs needs a CUDA device (this run uses cpu)" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_seg_inference_refuses_cuda_graphs_on_the_cpu_before_loading(command, tmp_path, capsys):
    extra = ["--data-dir", str(tmp_path)] if command == "eval" else [str(tmp_path / "a.png"),
                                                                      "--output", str(tmp_path)]
    rc = main(["seg", command, "--checkpoint", str(tmp_path / "missing.pth"), *extra,
               "--device", "cpu", "--cuda-graphs"])
    assert rc == 2
    assert "--cuda-graphs needs a CUDA device (this run uses cpu)" in capsys.readouterr().err


def test_a_table_read_by_a_recording_survives_the_cache_clear(monkeypatch):
    def table(n):
        return torch.arange(n)

    # a cache of its own: clearing the process's would drop what earlier tests' graphs pinned
    monkeypatch.setattr(tables, "_PINNED", set())
    monkeypatch.setattr(tables, "_CACHE", {})
    monkeypatch.setattr(tables, "capturing", lambda: True)  # a recording reads it
    pinned = tables.cached(table, 10_001)
    monkeypatch.setattr(tables, "capturing", lambda: False)
    for n in range(tables._LIMIT + 5):  # more than the cache holds: it is cleared
        tables.cached(table, n)
    assert tables.cached(table, 10_001) is pinned
    assert tables.cached(table, 3) is tables.cached(table, 3)


def test_seg_backbone_graphs_add_no_weights_and_keep_cpu_numbers():
    from transnext.tasks.segmentation.model import build_upernet
    torch.manual_seed(0)
    m = build_upernet("transnext_femto", 5, channels=16, aux_channels=8).eval()
    keys = list(m.state_dict())
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        ref = m(x).logits
        m.backbone.use_cuda_graphs()
        assert list(m.state_dict()) == keys
        assert torch.equal(m(x).logits, ref)
        m.backbone.use_cuda_graphs(False)
        assert torch.equal(m(x).logits, ref)


# ---- CUDA ------------------------------------------------------------------------

def _steps(fwd, model, xs, lr=1e-4):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    losses, grads = [], None
    for x in xs:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = _loss(fwd(x))
        loss.backward()
        if grads is None:
            grads = {n: p.grad.float().clone() for n, p in model.named_parameters()
                     if p.grad is not None}
        losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _assert_grads_close(got: dict, ref: dict) -> None:
    """1% per parameter, with a floor of 1e-5 of the largest gradient: some gradients (a
    temperature's, biases') are sums that cancel to ~1e-8, where the order of bf16 atomics
    shows."""
    assert got.keys() == ref.keys()
    floor = 1e-5 * max(v.norm().item() for v in ref.values())
    for n, v in ref.items():
        assert (got[n] - v).norm().item() <= 1e-2 * v.norm().item() + floor, (n, _rel(got[n], v))


@cuda
@pytest.mark.parametrize("pos_bias", ["interpolate", "extrapolate"])
def test_graphed_training_matches_eager(pos_bias, kernels_as_recorded):
    kw = dict(pos_bias="interpolate", img_size=64) if pos_bias == "interpolate" else {}
    ref = _backbone("cuda", **kw)
    g = copy.deepcopy(ref)
    net = GraphedForward(g, infer=False)
    torch.manual_seed(1)
    xs = [torch.randn(2, 3, 96, 136, device="cuda").contiguous(memory_format=torch.channels_last)
          for _ in range(4)]
    l_ref, g_ref = _steps(ref, ref, xs)
    l_g, g_g = _steps(net, g, xs)
    assert net.graphs == 1 and net.eager_calls == 0
    # different inputs each step: a replay that kept the first input would repeat its loss
    assert len(set(l_ref)) == 4
    assert l_g == pytest.approx(l_ref, rel=1e-4)
    _assert_grads_close(g_g, g_ref)
    for (n, p), q in zip(ref.named_parameters(), g.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-3, msg=n)  # 4 AdamW steps of 1e-4
    # another batch size runs eagerly, with the eager numbers
    x1 = xs[0][:1]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = _loss(net(x1)), _loss(g(x1))
    assert net.eager_calls == 1 and a.item() == pytest.approx(b.item(), rel=1e-5)


@cuda
def test_graphed_inference_matches_eager_and_follows_weight_updates(kernels_as_recorded):
    m = _backbone("cuda", pos_bias="interpolate", img_size=64).eval()
    net = GraphedForward(m)
    x = torch.randn(2, 3, 80, 112, device="cuda").contiguous(memory_format=torch.channels_last)

    def both():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return net(x), m(x)

    a, b = both()
    assert net.graphs == 1
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-2, atol=1e-2)
    with torch.no_grad():  # an optimizer's in-place update, the position-bias MLP included
        for p in m.parameters():
            p.mul_(1.05)
    a2, b2 = both()
    for u, v, old in zip(a2, b2, a):
        torch.testing.assert_close(u, v, rtol=1e-2, atol=1e-2)
        assert (u.float() - old.float()).abs().max() > 1e-2  # not the old weights' output
    # the stage tables the graph reads stay cached whatever else fills the cache
    assert tables._PINNED and all(k in tables._CACHE for k in tables._PINNED)


@cuda
def test_inference_graphs_of_several_shapes_share_one_pool(kernels_as_recorded):
    """A val set's padded shapes: one inference graph each, all in one memory pool. Any
    replay order gives the eager outputs, an output already returned is not overwritten by
    later replays, and the three graphs record into one pool. (Reserved memory: the
    second and third add about 0.7 of what the first took with its warm-up on an H200;
    with a new warm-up stream per recording, 2.7.)"""
    m = _backbone("cuda", pos_bias="interpolate", img_size=64).eval()
    net = GraphedForward(m, train=False, max_infer_graphs=3)
    shapes = [(192, 256), (256, 192), (128, 384)]
    xs = [torch.randn(4, 3, h, w, device="cuda").contiguous(memory_format=torch.channels_last)
          for h, w in shapes]
    extra = torch.randn(4, 3, 320, 128, device="cuda")

    def run(f, x):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return f(x)

    refs = [run(m, x) for x in xs]
    torch.cuda.synchronize()
    # a recording starts by emptying the allocator's cache: empty it first, so that what
    # earlier tests left cached is not counted as freed by the graphs
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved()
    first = run(net, xs[0])
    one = torch.cuda.memory_reserved() - base
    kept = [t.clone() for t in first]
    outs = [first] + [run(net, x) for x in xs[1:]]
    three = torch.cuda.memory_reserved() - base
    assert net.graphs == 3 and net.replays == 3 and net.eager_calls == 0
    for i in (2, 0, 1, 2):  # replays in another order than recorded
        outs[i] = run(net, xs[i])
    run(net, extra)  # a fourth shape: eager, past max_infer_graphs
    assert net.graphs == 3 and net.replays == 7 and net.eager_calls == 1
    for got, ref in zip(outs, refs):
        for u, v in zip(got, ref):
            torch.testing.assert_close(u, v, rtol=1e-2, atol=1e-2)
    for u, v in zip(first, kept):  # the copy handed out stays the caller's
        assert torch.equal(u, v)
    assert len({graph.pool() for graph, _, _ in net._infer.values()}) == 1
    assert 0 < one and three - one < one, (one, three)


@cuda
def test_seg_backbone_graphed_training_step_matches_eager(kernels_as_recorded):
    from transnext.tasks.segmentation.model import build_upernet
    torch.manual_seed(0)
    ref = build_upernet("transnext_femto", 5, channels=16, aux_channels=8, img_size=64,
                        classifier_dropout=0.0).cuda().train()
    g = copy.deepcopy(ref)
    g.backbone.use_cuda_graphs()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    y = torch.randint(0, 5, (2, 64, 64), device="cuda")
    out = []
    for model in (ref, g):
        for _ in range(2):  # the second step replays the recorded graphs
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, labels=y).loss
            loss.backward()
        out.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters()
                                  if p.grad is not None}))
    assert g.backbone.graphed.graphs == 1
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-4)
    _assert_grads_close(out[1][1], out[0][1])


@cuda
def test_train_job_with_cuda_graphs(tiny_folder, tmp_path, caplog):
    """`transnext train --cuda-graphs`: every full batch replays the graph, and training
    follows the eager job's losses."""
    import json

    def run(out, *extra):
        assert main(["train", "--model", "transnext_femto", "--data-dir", str(tiny_folder),
                     "--output", str(out), "--input-size", "32", "--batch-size", "8",
                     "--workers", "0", "--no-progress", "--no-tensorboard", "--seed", "0",
                     "--lr", "1e-4", "--warmup-epochs", "0", "--epochs", "2", "--device",
                     "cuda", "--amp", "bf16", "--drop-path", "0", *extra]) == 0
        return [r["train_loss"] for r in json.loads((out / "metrics.json").read_text())]

    # 24 images, batches of 8, 2 epochs; each epoch's validation: 9 images, batches of 8 and 1
    graphs_follow_eager(run, tmp_path, caplog, replays=6, evals=4)


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@two_gpus
def test_train_job_with_cuda_graphs_under_torchrun(tiny_folder, tmp_path):
    """`transnext train --cuda-graphs` in two NCCL processes (torchrun): the recording
    survives NCCL's watchdog thread (thread-local capture), every full batch replays, and
    the losses follow the eager two-process job's."""
    import json

    from conftest import run_ok, torchrun

    def run(out, *extra):
        p = run_ok(torchrun("train", "--model", "transnext_femto", "--data-dir",
                            str(tiny_folder), "--output", str(out), "--input-size", "32",
                            "--batch-size", "4", "--workers", "0", "--no-progress",
                            "--no-tensorboard", "--seed", "0", "--lr", "1e-4",
                            "--warmup-epochs", "0", "--epochs", "2", "--device", "cuda",
                            "--amp", "bf16", "--drop-path", "0", *extra))
        return [r["train_loss"] for r in json.loads((out / "metrics.json").read_text())], p

    ref, _ = run(tmp_path / "eager")
    got, p = run(tmp_path / "graphs", "--cuda-graphs")
    # 24 images over 2 ranks, batches of 4: 3 steps an epoch on each rank, 2 epochs
    assert "CUDA graphs: 6 call(s) replayed, 0 run eagerly" in p.stdout + p.stderr
    assert got == pytest.approx(ref, rel=1e-2)


@cuda
def test_seg_sliding_window_with_backbone_graphs_matches_eager(kernels_as_recorded):
    from transnext.tasks.segmentation.inference import slide
    from transnext.tasks.segmentation.model import build_upernet
    torch.manual_seed(0)
    m = build_upernet("transnext_femto", 5, channels=16, aux_channels=8, img_size=64).cuda().eval()
    x = torch.randn(1, 3, 64, 100, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = slide(m, x, 64, 40)
        m.backbone.use_cuda_graphs(train=False, infer=True)
        got = [slide(m, x, 64, 40) for _ in range(2)]  # records, then replays
    g = m.backbone.graphed
    assert g.graphs == 1 and g.replays == 2 and g.eager_calls == 0
    for out in got:
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
