"""Fixed canvases for detection training under --cuda-graphs (tasks.detection.canvas):
every resized training image fits one, the two detectors pad training batches to it and
keep the images' sizes, and evaluation keeps the usual padding."""
from __future__ import annotations

import random

import pytest
import torch

from transnext.tasks.detection.canvas import pick_canvas, train_canvases, use_canvases
from transnext.tasks.detection.mmdet_compat import MMDetTransform, mmdet_rescale_size


def test_canvases_of_the_recipes():
    assert train_canvases(800, 1333) == [(800, 1344), (1344, 800)]
    dino_scales = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    assert train_canvases(dino_scales, 1333) == [(800, 1344), (1344, 800)]
    assert train_canvases(128, 128) == [(128, 128)]  # square: one canvas, one graph
    assert train_canvases([96, 160], 213) == [(160, 224), (224, 160)]
    assert train_canvases(800, 600) == [(608, 608)]  # the long side bounds the short one
    with pytest.raises(ValueError, match="must be positive"):
        train_canvases([], 1333)


@pytest.mark.parametrize("sides,max_size", [(800, 1333), ([480, 640, 800], 1333),
                                            ([96, 128, 160], 213), (64, 64)])
def test_every_resized_image_fits_a_canvas(sides, max_size):
    canvases = train_canvases(sides, max_size)
    rng = random.Random(0)
    short_sides = [sides] if isinstance(sides, int) else sides
    for _ in range(2000):
        h, w = rng.randint(8, 3000), rng.randint(8, 3000)
        nh, nw = mmdet_rescale_size(h, w, rng.choice(short_sides), max_size)
        assert pick_canvas(nh, nw, canvases) is not None, (h, w, nh, nw)
        # landscape images (the grouped sampler's group 1) all fit the first canvas, the
        # others the last: a batch of either group fits one canvas
        want = canvases[0] if nw > nh else canvases[-1]
        assert nh <= want[0] and nw <= want[1], (h, w, nh, nw, want)


def test_pick_canvas_takes_the_smallest_that_holds_the_batch():
    cs = [(800, 1344), (1344, 800), (1344, 1344)]
    assert pick_canvas(800, 800, cs) == (800, 1344)  # equal areas: the first in (H, W) order
    assert pick_canvas(1000, 700, cs) == (1344, 800)
    assert pick_canvas(900, 900, cs) == (1344, 1344)
    assert pick_canvas(1400, 10, cs) is None


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 60, 90, generator=g), torch.rand(3, 40, 100, generator=g)]


def test_mask_rcnn_transform_pads_training_batches_to_the_canvas():
    t = MMDetTransform(min_size=64, max_size=128)
    plain, sizes = t(_images())[0].tensors, t(_images())[0].image_sizes
    assert plain.shape[-2:] == (64, 128)  # the batch's own padding (to 32)
    t.canvases = [(96, 160), (160, 96)]
    got = t(_images())[0]
    assert got.tensors.shape == (2, 3, 96, 160)
    assert got.image_sizes == sizes
    torch.testing.assert_close(got.tensors[..., :64, :128], plain, rtol=0, atol=0)
    assert got.tensors[..., 64:, :].abs().max() == 0 and got.tensors[..., 128:].abs().max() == 0
    t.eval()  # evaluation keeps the usual padding
    assert t(_images())[0].tensors.shape == plain.shape


def test_a_batch_no_canvas_holds_is_padded_as_usual():
    t = MMDetTransform(min_size=64, max_size=128)
    t.canvases = [(32, 32)]
    assert t(_images())[0].tensors.shape[-2:] == (64, 128)


def test_dino_pads_training_batches_to_the_canvas():
    from test_det_dino import small_dino
    net = small_dino()
    use_canvases(net, [(96, 128), (128, 96)])
    images = [torch.rand(3, 64, 80), torch.rand(3, 56, 96)]
    net.train()
    x, shapes = net.preprocess(images, resize=False)
    assert x.shape == (2, 3, 96, 128) and shapes == [(64, 80), (56, 96)]
    plain = net.eval().preprocess(images, resize=False)[0]
    assert plain.shape == (2, 3, 64, 96)  # evaluation: the batch's own padding
    torch.testing.assert_close(x[..., :64, :96], plain, rtol=0, atol=0)


def test_mask_rcnn_train_step_on_a_canvas():
    """The whole detector trains on a canvas-padded batch: RPN and RoI losses come from the
    images' own sizes (the boxes are the same; only the padding grew)."""
    from transnext.tasks.detection.maskrcnn import build_maskrcnn
    torch.manual_seed(0)
    net = build_maskrcnn("transnext_micro", 3, min_size=64, max_size=96, img_size=64,
                         fpn_channels=32, box_fc=64, mask_channels=16,
                         rpn_batch_size_per_image=32, box_batch_size_per_image=16).train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 50, 90)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0]]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, 64, 80, dtype=torch.uint8)},
               {"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([2]),
                "masks": torch.ones(1, 50, 90, dtype=torch.uint8)}]
    use_canvases(net, [(96, 128)])
    seen = []
    net.backbone.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    losses = net(images, targets)
    assert seen == [(2, 3, 96, 128)]
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_graph_holder_is_where_the_transnext_graphs_live():
    """DINO holds its TransNeXt's graphs itself, Mask R-CNN in its backbone (the FPN
    module): what `det train/eval/predict --cuda-graphs` switch on."""
    from test_det_dino import small_dino
    from transnext.tasks.detection.canvas import graph_holder
    from transnext.tasks.detection.maskrcnn import build_maskrcnn
    dino = small_dino()
    mrcnn = build_maskrcnn("transnext_micro", 3, min_size=64, max_size=96, img_size=64,
                           fpn_channels=32, box_fc=64, mask_channels=16)
    for net, holder in ((dino, dino), (mrcnn, mrcnn.backbone)):
        assert graph_holder(net) is holder
        holder.use_cuda_graphs(train=False, infer=True, max_infer_graphs=5)
        assert holder.graphed.max_infer_graphs == 5
