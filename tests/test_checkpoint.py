"""Checkpoints in the published layout (SPEC section 7), built here from the
SPEC's naming and shapes, loaded every supported way; refusals with reasons."""
from __future__ import annotations

import pickle
from collections import OrderedDict

import pytest
import timm
import torch
from safetensors.torch import save_file

import transnext
from transnext import CheckpointError

# SPEC section 1 (femto is this project's own small model).
ARCH = {
    "transnext_micro": dict(dims=(48, 96, 192, 384), heads=(2, 4, 8, 16), depths=(2, 2, 15, 2),
                            mlp=(8, 8, 4, 4), sr=(8, 4, 2, 1)),
    "transnext_tiny": dict(dims=(72, 144, 288, 576), heads=(3, 6, 12, 24), depths=(2, 2, 15, 2),
                           mlp=(8, 8, 4, 4), sr=(8, 4, 2, 1)),
    "transnext_micro_aaaa": dict(dims=(48, 96, 192, 384), heads=(2, 4, 8, 16),
                                 depths=(2, 2, 15, 2), mlp=(8, 8, 4, 4), sr=(16, 8, 4, 2)),
    "transnext_femto": dict(dims=(32, 64, 128, 256), heads=(1, 2, 4, 8), depths=(1, 1, 3, 1),
                            mlp=(4, 4, 4, 4), sr=(4, 2, 2, 1)),
}
W = 3  # window



def published_shapes(name: str, num_classes: int = 1000, in_chans: int = 3) -> OrderedDict:
    """key -> shape of a released classification checkpoint (SPEC sections 2-7)."""
    a = ARCH[name]
    out = OrderedDict()
    for i in range(4):
        C, h = a["dims"][i], a["heads"][i]
        d = C // h
        cin = in_chans if i == 0 else a["dims"][i - 1]
        k = 7 if i == 0 else 3
        pe = f"patch_embed{i + 1}"
        out[f"{pe}.proj.weight"] = (C, cin, k, k)
        out[f"{pe}.proj.bias"] = (C,)
        out[f"{pe}.norm.weight"] = (C,)
        out[f"{pe}.norm.bias"] = (C,)
        hidden = int(2 * int(C * a["mlp"][i]) / 3)
        for j in range(a["depths"][i]):
            b = f"block{i + 1}.{j}"
            out[f"{b}.norm1.weight"] = (C,)
            out[f"{b}.norm1.bias"] = (C,)
            at = f"{b}.attn"
            out[f"{at}.temperature"] = (h, 1, 1)
            out[f"{at}.query_embedding"] = (h, 1, d)
            if a["sr"][i] > 1:
                out[f"{at}.q.weight"] = (C, C)
                out[f"{at}.q.bias"] = (C,)
                out[f"{at}.kv.weight"] = (2 * C, C)
                out[f"{at}.kv.bias"] = (2 * C,)
                out[f"{at}.proj.weight"] = (C, C)
                out[f"{at}.proj.bias"] = (C,)
                out[f"{at}.sr.weight"] = (C, C, 1, 1)
                out[f"{at}.sr.bias"] = (C,)
                out[f"{at}.norm.weight"] = (C,)
                out[f"{at}.norm.bias"] = (C,)
                out[f"{at}.relative_pos_bias_local"] = (h, W * W)
                out[f"{at}.learnable_tokens"] = (h, d, W * W)
                out[f"{at}.learnable_bias"] = (h, 1, W * W)
            else:
                out[f"{at}.qkv.weight"] = (3 * C, C)
                out[f"{at}.qkv.bias"] = (3 * C,)
                out[f"{at}.proj.weight"] = (C, C)
                out[f"{at}.proj.bias"] = (C,)
            out[f"{at}.cpb_fc1.weight"] = (512, 2)
            out[f"{at}.cpb_fc1.bias"] = (512,)
            out[f"{at}.cpb_fc2.weight"] = (h, 512)
            out[f"{at}.cpb_fc2.bias"] = (h,)
            out[f"{b}.norm2.weight"] = (C,)
            out[f"{b}.norm2.bias"] = (C,)
            out[f"{b}.mlp.fc1.weight"] = (2 * hidden, C)
            out[f"{b}.mlp.fc1.bias"] = (2 * hidden,)
            out[f"{b}.mlp.dwconv.dwconv.weight"] = (hidden, 1, 3, 3)
            out[f"{b}.mlp.dwconv.dwconv.bias"] = (hidden,)
            out[f"{b}.mlp.fc2.weight"] = (C, hidden)
            out[f"{b}.mlp.fc2.bias"] = (C,)
        out[f"norm{i + 1}.weight"] = (C,)
        out[f"norm{i + 1}.bias"] = (C,)
    if num_classes:
        out["head.weight"] = (num_classes, a["dims"][3])
        out["head.bias"] = (num_classes,)
    return out


def published_state_dict(name: str, seed: int = 0, **kw) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((k, 0.05 * torch.randn(s, generator=g))
                       for k, s in published_shapes(name, **kw).items())


def assert_weights_equal(model, sd, skip_head=False):
    own = model.state_dict()
    for k, v in sd.items():
        if skip_head and k.startswith("head."):
            continue
        assert torch.equal(own[k], v), k


def fwd(model, x):
    with torch.no_grad():
        return model.eval()(x)


# ---- fixtures: one micro checkpoint in every layout -------------------------------

@pytest.fixture(scope="module")
def micro_sd():
    return published_state_dict("transnext_micro", seed=1)


@pytest.fixture(scope="module")
def micro_files(micro_sd, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    files = {}
    files["plain"] = d / "transnext_micro_224_1k.pth"
    torch.save(micro_sd, files["plain"])
    files["model"] = d / "under_model.pth"
    torch.save({"model": micro_sd, "epoch": 299, "max_accuracy": 82.5}, files["model"])
    det = OrderedDict((f"backbone.{k}", v) for k, v in micro_sd.items() if not k.startswith("head."))
    det["neck.fpn.0.weight"] = torch.randn(256, 48, 1, 1)
    det["neck.fpn.0.bias"] = torch.randn(256)
    det["decode_head.conv_seg.weight"] = torch.randn(150, 512, 1, 1)
    det["roi_head.bbox_head.fc_cls.weight"] = torch.randn(81, 1024)
    files["det"] = d / "mask_rcnn_transnext_micro.pth"
    torch.save({"state_dict": det, "meta": {"epoch": 12, "mmdet_version": "3.0.0",
                                            "CLASSES": ["person", "car"]}}, files["det"])
    files["st"] = d / "transnext_micro.safetensors"
    save_file({k: v.contiguous() for k, v in micro_sd.items()}, str(files["st"]))
    return files


# ---- layout ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["transnext_micro", "transnext_tiny", "transnext_micro_aaaa"])
def test_state_dict_is_the_published_layout(name):
    m = transnext.create_model(name)
    want = published_shapes(name)
    own = m.state_dict()
    assert set(own) == set(want)
    assert {k: tuple(v.shape) for k, v in own.items()} == dict(want)
    # no buffers (position tables, masks, length scales) are stored
    assert set(own) == {n for n, _ in m.named_parameters()}
    assert len(list(m.buffers())) == 0


def test_features_only_layout():
    fm = timm.create_model("transnext_micro", features_only=True)
    want = {k for k in published_shapes("transnext_micro") if not k.startswith("head.")}
    assert set(fm.model.state_dict()) == want


# ---- loading every way ------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["plain", "model", "st"])
def test_load_checkpoint_classification(micro_sd, micro_files, fmt):
    m = transnext.create_model("transnext_micro")
    obj = transnext.load_checkpoint(m, micro_files[fmt])
    assert isinstance(obj, dict)
    assert_weights_equal(m, micro_sd)


def test_load_checkpoint_det_into_backbone(micro_sd, micro_files):
    m = transnext.create_model("transnext_micro", num_classes=0)
    obj = transnext.load_checkpoint(m, micro_files["det"])
    assert obj["meta"]["epoch"] == 12
    assert_weights_equal(m, micro_sd, skip_head=True)
    fm = timm.create_model("transnext_micro", features_only=True, out_indices=(0, 1, 2, 3))
    transnext.load_checkpoint(fm, micro_files["det"])
    assert_weights_equal(fm.model, micro_sd, skip_head=True)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        feats = fm.eval()(x)
        ref = m.eval().forward_intermediates(x, intermediates_only=True)
    for a, b in zip(feats, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["plain", "model", "st"])
def test_timm_pretrained_file(micro_sd, micro_files, fmt):
    m = timm.create_model("transnext_micro", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(micro_files[fmt])))
    assert_weights_equal(m, micro_sd)
    if fmt == "plain":
        ref = transnext.create_model("transnext_micro")
        transnext.load_checkpoint(ref, micro_files["st"])
        x = torch.randn(2, 3, 64, 80)
        torch.testing.assert_close(fwd(m, x), fwd(ref, x), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["plain", "det"])
def test_timm_pretrained_features_only(micro_sd, micro_files, fmt):
    fm = timm.create_model("transnext_micro", pretrained=True, features_only=True,
                           pretrained_cfg_overlay=dict(file=str(micro_files[fmt])))
    assert_weights_equal(fm.model, micro_sd, skip_head=True)
    fm2 = timm.create_model("transnext_micro", pretrained=True, features_only=True,
                            out_indices=(1, 2),
                            pretrained_cfg_overlay=dict(file=str(micro_files[fmt])))
    assert fm2.feature_info.channels() == [96, 192]
    assert torch.equal(fm2.model.state_dict()["block3.14.attn.learnable_tokens"],
                       micro_sd["block3.14.attn.learnable_tokens"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = fm.eval()(x)
        b = fm2.eval()(x)
    torch.testing.assert_close(b[0], a[1], rtol=0, atol=0)
    torch.testing.assert_close(b[1], a[2], rtol=0, atol=0)


def test_timm_pretrained_other_num_classes(micro_sd, micro_files):
    m = timm.create_model("transnext_micro", pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(file=str(micro_files["plain"])))
    assert m.head.weight.shape == (10, 384)
    assert_weights_equal(m, micro_sd, skip_head=True)
    ref = transnext.create_model("transnext_micro", num_classes=0)
    transnext.load_checkpoint(ref, micro_files["det"])
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(m.eval().forward_head(m.forward_features(x), pre_logits=True),
                                   fwd(ref, x), rtol=0, atol=0)


def test_drop_head_and_head_shape_hint(micro_sd, micro_files):
    m = transnext.create_model("transnext_micro", num_classes=10)
    head_before = m.head.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"wrong shape.*drop_head=True.*head\.weight"):
        transnext.load_checkpoint(m, micro_files["plain"])
    transnext.load_checkpoint(m, micro_files["plain"], drop_head=True)
    assert_weights_equal(m, micro_sd, skip_head=True)
    assert torch.equal(m.head.weight, head_before)


def test_femto_roundtrip_and_derived_buffers(tmp_path):
    sd = published_state_dict("transnext_femto", seed=3, num_classes=10, in_chans=1)
    m = transnext.create_model("transnext_femto")
    assert set(m.state_dict()) == set(sd)
    # exports of the authors' code may carry derived tables; they are rebuilt here
    with_buffers = dict(sd)
    with_buffers["block1.0.attn.relative_pos_index"] = torch.zeros(3, 3, dtype=torch.long)
    with_buffers["block1.0.attn.relative_coords_table"] = torch.zeros(5, 2)
    p = tmp_path / "femto.pth"
    torch.save({"model": with_buffers}, p)
    transnext.load_checkpoint(m, p)
    assert_weights_equal(m, sd)
    m2 = timm.create_model("transnext_femto", pretrained=True,
                           pretrained_cfg_overlay=dict(file=str(p)))
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(fwd(m2, x), fwd(m, x), rtol=0, atol=0)


# ---- refusals -------------------------------------------------------------------

@pytest.fixture()
def femto_sd():
    return published_state_dict("transnext_femto", seed=4, num_classes=10, in_chans=1)


def test_missing_keys_named(femto_sd, tmp_path):
    sd = dict(femto_sd)
    del sd["block3.2.attn.learnable_tokens"]
    del sd["norm2.weight"]
    p = tmp_path / "missing.pth"
    torch.save(sd, p)
    m = transnext.create_model("transnext_femto")
    with pytest.raises(CheckpointError, match=r"missing 2 key\(s\)") as e:
        transnext.load_checkpoint(m, p)
    assert "block3.2.attn.learnable_tokens" in str(e.value) and "norm2.weight" in str(e.value)
    with pytest.raises(Exception, match=r"block3\.2\.attn\.learnable_tokens"):
        timm.create_model("transnext_femto", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(p)))


def test_unexpected_keys_named(femto_sd, tmp_path):
    sd = dict(femto_sd)
    sd["block1.0.attn.extra_scale"] = torch.ones(1)
    sd["fc_norm.weight"] = torch.ones(256)
    p = tmp_path / "unexpected.pth"
    torch.save(sd, p)
    m = transnext.create_model("transnext_femto")
    with pytest.raises(CheckpointError, match=r"unexpected 2 key\(s\)") as e:
        transnext.load_checkpoint(m, p)
    assert "block1.0.attn.extra_scale" in str(e.value) and "fc_norm.weight" in str(e.value)
    assert "missing" not in str(e.value)
    with pytest.raises(Exception, match=r"fc_norm\.weight"):
        timm.create_model("transnext_femto", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(p)))


def test_other_variant_refused(micro_files):
    tiny = transnext.create_model("transnext_tiny")
    with pytest.raises(CheckpointError, match=r"transnext_micro.*transnext_tiny"):
        transnext.load_checkpoint(tiny, micro_files["plain"])
    aaaa = transnext.create_model("transnext_micro_aaaa")
    with pytest.raises(CheckpointError, match=r"transnext_micro\b.*transnext_micro_aaaa"):
        transnext.load_checkpoint(aaaa, micro_files["st"])
    with pytest.raises(CheckpointError, match=r"transnext_micro\b.*transnext_micro_aaaa"):
        timm.create_model("transnext_micro_aaaa", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(micro_files["det"])))


def test_aaaa_checkpoint_into_micro_refused(tmp_path):
    p = tmp_path / "aaaa.pth"
    torch.save(published_state_dict("transnext_micro_aaaa", seed=5), p)
    m = transnext.create_model("transnext_micro")
    with pytest.raises(CheckpointError, match=r"transnext_micro_aaaa.*model is transnext_micro\b"):
        transnext.load_checkpoint(m, p)
    aaaa = transnext.create_model("transnext_micro_aaaa")
    transnext.load_checkpoint(aaaa, p)  # the right model takes it


def test_corrupt_and_truncated_files(femto_sd, tmp_path):
    good = tmp_path / "good.pth"
    torch.save(femto_sd, good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(data[: len(data) // 2])
    m = transnext.create_model("transnext_femto")
    with pytest.raises(CheckpointError, match=r"trunc\.pth is truncated or damaged"):
        transnext.load_checkpoint(m, trunc)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.pth is not a checkpoint file"):
        transnext.load_checkpoint(m, junk)
    st = tmp_path / "bad.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match=r"truncated or damaged safetensors"):
        transnext.load_checkpoint(m, st)
    good_st = tmp_path / "good.safetensors"
    save_file(dict(femto_sd), str(good_st))
    st_trunc = tmp_path / "trunc.safetensors"
    st_trunc.write_bytes(good_st.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"truncated or damaged|not a safetensors"):
        transnext.load_checkpoint(m, st_trunc)
    with pytest.raises(CheckpointError, match=r"not found"):
        transnext.load_checkpoint(m, tmp_path / "nope.pth")
    # the model was not touched by any failed load
    transnext.load_checkpoint(m, good)
    assert_weights_equal(m, femto_sd)


EXECUTED = []


def _mark(tag):
    EXECUTED.append(tag)


class Payload:
    """A non-tensor object whose unpickling would run code."""

    def __reduce__(self):
        return (_mark, ("pwned",))


class Plain:
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("obj,protocol", [("reduce", 2), ("instance", 2), ("reduce", 4),
                                          ("instance", 4)])
def test_non_tensor_pickle_refused(femto_sd, tmp_path, obj, protocol):
    """Refused naming the global the pickle asks for (protocol 4 too, whose frames torch's
    unpickler reports as an unknown operand); never the advice to drop weights_only."""
    p = tmp_path / "evil.pth"
    extra = Payload() if obj == "reduce" else Plain()
    torch.save({"model": femto_sd, "args": extra}, p, pickle_protocol=protocol)
    wanted = r"_mark" if obj == "reduce" else r"Plain"
    m = transnext.create_model("transnext_femto")
    with pytest.raises(CheckpointError, match=rf"refusing to load .*evil\.pth.*{wanted}") as e:
        transnext.load_checkpoint(m, p)
    assert "weights_only" not in str(e.value) and "\x1b" not in str(e.value)
    with pytest.raises(CheckpointError, match=rf"refusing to load .*evil\.pth.*{wanted}") as e:
        timm.create_model("transnext_femto", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(p)))
    assert "weights_only" not in str(e.value)
    assert EXECUTED == []


def test_timm_file_path_names_the_problem(femto_sd, tmp_path):
    """timm's pretrained-file path gives the loader's reasons, not torch's text."""
    junk = tmp_path / "random.pth"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=r"random\.pth is not a checkpoint file"):
        timm.create_model("transnext_femto", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(junk)))
    good = tmp_path / "good.pth"
    torch.save({"model": femto_sd}, good)
    m = timm.create_model("transnext_femto", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(good)))
    assert_weights_equal(m, femto_sd)
    assert m.pretrained_cfg.get("state_dict") is None  # no second copy kept
    f = timm.create_model("transnext_femto", pretrained=True, features_only=True,
                          pretrained_cfg_overlay=dict(file=str(good)))
    assert all(getattr(x, "pretrained_cfg", {}).get("state_dict") is None
               for x in f.modules())
    with pytest.raises(CheckpointError, match=r"good\.pth holds weights of transnext_femto"):
        timm.create_model("transnext_micro", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(good)))


def test_payload_would_execute_without_weights_only(tmp_path):
    """Guards the test above: the payload is real (pickle.loads runs it)."""
    before = len(EXECUTED)
    pickle.loads(pickle.dumps(Payload()))
    assert len(EXECUTED) == before + 1
    EXECUTED.clear()


def test_not_a_dict_refused(tmp_path):
    p = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], p)
    with pytest.raises(CheckpointError, match=r"not a state dict"):
        transnext.load_checkpoint(transnext.create_model("transnext_femto"), p)


def test_protocol_4_weights_loaded_or_named(femto_sd, tmp_path):
    """Plain weights pickled with protocol 4: torch's weights-only reader may not read its
    frames; then the refusal says so (not 'corrupt', no global to blame)."""
    p = tmp_path / "p4.pth"
    torch.save(femto_sd, p, pickle_protocol=4)
    m = transnext.create_model("transnext_femto")
    try:
        transnext.load_checkpoint(m, p)
    except CheckpointError as e:
        assert "pickle protocol 4" in str(e) and "safetensors" in str(e), e
    else:
        assert_weights_equal(m, femto_sd)
