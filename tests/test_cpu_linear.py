"""ops.cpu_linear: fp32 CPU inference products from oneDNN-packed weights, against
F.linear, and a packed model against the same model unpacked."""
from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
import torch.nn.functional as F

import transnext  # noqa: F401  (registers the models)
from transnext.ops import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="torch without oneDNN")


def _opted_in(weight):
    w = torch.nn.Parameter(weight)
    setattr(w, cpu_linear._SLOTS, cpu_linear._Slots())
    return w


@pytest.mark.parametrize("shape,rows,bias", [
    ((196, 72), None, True),          # 2-D tokens
    ((2, 49, 72), None, True),        # (B, N, C)
    ((2, 49, 72), (16, 48), True),    # a row block (the GLU's fc1 halves)
    ((3, 7, 72), None, False),
])
def test_packed_product_matches_f_linear(shape, rows, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = _opted_in(torch.randn(64, 72, generator=g))
    b = torch.randn(64, generator=g) if bias else None
    with torch.no_grad():
        got = cpu_linear.linear(x, w, b, rows)
        assert got is not None
        torch.testing.assert_close(got, cpu_linear.reference(x, w, b, rows), rtol=1e-5, atol=1e-5)
        # a 1x1 conv's weight, as the model's `sr` runs it
        conv = _opted_in(w.detach().reshape(64, 72, 1, 1).clone())
        torch.testing.assert_close(cpu_linear.linear(x, conv, b),
                                   F.linear(x, conv.reshape(64, 72), b), rtol=1e-5, atol=1e-5)


def test_packed_product_applies_only_where_it_should(monkeypatch):
    x = torch.randn(4, 8)
    w = _opted_in(torch.randn(5, 8))
    assert cpu_linear.linear(x, w, None) is None  # autograd on
    with torch.no_grad():
        assert cpu_linear.linear(x, torch.randn(5, 8), None) is None  # not opted in
        assert cpu_linear.linear(x.double(), w, None) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cpu_linear.linear(x, w, None) is None
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # oneDNN switched off
        assert cpu_linear.linear(x, w, None) is None
        monkeypatch.undo()
        assert cpu_linear.linear(x, w, None) is not None


def test_packed_copy_follows_in_place_changes_of_its_weight():
    w = _opted_in(torch.randn(6, 8))
    x = torch.randn(3, 8)
    with torch.no_grad():
        cpu_linear.linear(x, w, None)
        w.mul_(2)  # an optimizer step or load_state_dict: the version counter moves
        torch.testing.assert_close(cpu_linear.linear(x, w, None), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_packed_model_matches_unpacked_and_follows_new_weights():
    torch.manual_seed(0)
    model = timm.create_model("transnext_femto", num_classes=10, in_chans=3).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        ref = model(x)
        assert cpu_linear.pack_linears(model) > 0
        got = model(x)
    slots = [getattr(p, cpu_linear._SLOTS) for p in model.parameters()
             if hasattr(p, cpu_linear._SLOTS)]
    assert sum(len(s) for s in slots) > 0  # the packed path ran
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)

    # a whole-model save and a deep copy work (packed oneDNN tensors have no storage: they
    # are left out)
    buf = io.BytesIO()
    torch.save(model, buf)
    twin = copy.deepcopy(model)
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), got, rtol=1e-4, atol=1e-5)

    other = timm.create_model("transnext_femto", num_classes=10, in_chans=3).eval()
    model.load_state_dict(other.state_dict())  # in place: every packed copy goes stale
    with torch.inference_mode():
        torch.testing.assert_close(model(x), other(x), rtol=1e-4, atol=1e-5)

    # training runs F.linear (autograd) and leaves the packed copies alone
    model.train()
    loss = model(x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    assert cpu_linear.pack_linears(model, enable=False) == len(slots)
    assert not any(hasattr(p, cpu_linear._SLOTS) for p in model.parameters())
