"""COCO data layer, COCO AP and the Fashion-MNIST instance mosaics, on real files:
PNG/JPEG images and instance jsons written here, the real pycocotools COCOeval,
a real two-process gloo group for the distributed gather."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from conftest import free_port
from transnext.data.fashion_mnist import DataError
from transnext.tasks.detection.coco import (
    BAD_POLY, BAD_RLE, NO_SEGM, OUTSIDE, ZERO_AREA, ZERO_SIZE, CocoDetection,
    RandomHorizontalFlip, collate, hflip, resolve_coco, rle_string_counts)
from transnext.tasks.detection.evaluation import CocoEvaluator, format_table, run_cocoeval
from transnext.tasks.detection.names import (
    cat_id_to_label, coco_category_ids, coco_classes, label_to_cat_id)
from transnext.tasks.detection.sampler import GroupedBatchSampler

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist "
                                                               "is not installed")


# ------------------------------------------------------------------ helpers

def write_set(root: Path, images, annotations, categories=None, name="instances_val2017.json",
              img_sub="val2017", pixels=None) -> tuple[Path, Path]:
    """Real image files (PNG, or JPEG by extension) and a COCO json under root."""
    img_dir, ann_dir = root / img_sub, root / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for im in images:
        if not im["width"] > 0 < im["height"]:
            continue
        arr = (pixels or {}).get(im["id"])
        if arr is None:
            arr = rng.integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8)
        Image.fromarray(arr).save(img_dir / im["file_name"])
    if categories is None:
        categories = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]
    (ann_dir / name).write_text(json.dumps({"images": images, "annotations": annotations,
                                            "categories": categories}))
    return ann_dir / name, img_dir


def img(i, w, h, ext="png"):
    return {"id": i, "file_name": f"{i:03d}.{ext}", "width": w, "height": h}


def ann(i, image_id, bbox, cat=1, seg=None, **kw):
    a = {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox,
         "area": kw.pop("area", 1.0), "iscrowd": kw.pop("iscrowd", 0)}
    if seg is not None:
        a["segmentation"] = seg
    a.update(kw)
    return a


def rect_poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def rle_str(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode()}


def rle_list(mask: np.ndarray) -> dict:
    """Uncompressed RLE written by hand: runs of the column-major pixels, from 0."""
    flat = mask.astype(np.uint8).reshape(-1, order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return {"size": list(mask.shape), "counts": runs}


def rect_mask(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


# ------------------------------------------------------------------ names

def test_coco_names_and_label_mapping():
    names, ids = coco_classes(), coco_category_ids()
    assert len(names) == len(ids) == 80 and names[0] == "person" and names[-1] == "toothbrush"
    assert "traffic light" in names and "hair drier" in names
    assert ids == sorted(ids) and ids[-1] == 90
    assert sorted(set(range(1, 91)) - set(ids)) == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    l2c, c2l = label_to_cat_id(ids), cat_id_to_label(ids)
    assert l2c[1] == 1 and l2c[11] == 11 and l2c[12] == 13 and l2c[80] == 90
    assert all(c2l[c] == lab for lab, c in l2c.items())
    assert names[c2l[13] - 1] == "stop sign"


# ------------------------------------------------------------------ dataset

def test_resolve_layouts(tmp_path):
    a, i = write_set(tmp_path, [img(1, 8, 8)], [], name="instances_train2017.json",
                     img_sub="train2017")
    assert resolve_coco(tmp_path, "train") == (a, i)
    with pytest.raises(DataError, match="instances_val2017.json"):
        resolve_coco(tmp_path, "val")
    assert resolve_coco(ann_file=a, img_dir=i) == (a, i)
    with pytest.raises(DataError, match="needs both"):
        resolve_coco(ann_file=a)
    with pytest.raises(DataError, match="nothere"):
        resolve_coco(ann_file=a, img_dir=tmp_path / "nothere")
    with pytest.raises(DataError, match="does not exist"):
        resolve_coco(tmp_path / "missing", "train")


def test_items_polygon_and_rle_masks_labels_and_images(tmp_path):
    h1, w1, h2, w2 = 40, 64, 48, 30
    pix1 = np.random.default_rng(1).integers(0, 256, (h1, w1, 3), dtype=np.uint8)
    m_list = rect_mask(h1, w1, 40, 5, 50, 30)
    m_list[20:25, 45:60] = 1  # not a rectangle: an L shape
    m_str = rect_mask(h2, w2, 3, 10, 20, 40)
    anns = [
        ann(10, 1, [4, 6, 20, 10], cat=3, seg=rect_poly(4, 6, 24, 16) + rect_poly(30, 30, 36, 36)),
        ann(11, 1, [40, 5, 20, 25], cat=1, seg=rle_list(m_list), area=float(m_list.sum())),
        ann(12, 2, [3, 10, 17, 30], cat=1, seg=rle_str(m_str), area=float(m_str.sum())),
        ann(13, 2, [0, 0, 30, 48], cat=1, seg=rle_str(np.ones((h2, w2))), iscrowd=1),
    ]
    a, d = write_set(tmp_path, [img(1, w1, h1), img(2, w2, h2, "jpg"), img(3, 20, 20)], anns,
                     pixels={1: pix1})
    ds = CocoDetection(a, d)
    assert ds.class_names == ["a", "b"] and ds.cat_ids == [1, 3]
    assert ds.label_to_cat_id == {1: 1, 2: 3} and ds.num_classes == 2
    assert ds.image_ids == [1, 2, 3] and ds.sizes == [(h1, w1), (h2, w2), (20, 20)]
    assert ds.report.crowd == 1 and ds.report.n_skipped == 0

    image, t = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, h1, w1)
    torch.testing.assert_close(image, torch.from_numpy(pix1).permute(2, 0, 1).float() / 255)
    assert t["image_id"] == 1 and t["labels"].tolist() == [2, 1]
    assert t["ann_ids"].tolist() == [10, 11] and t["iscrowd"].tolist() == [0, 0]
    torch.testing.assert_close(t["boxes"], torch.tensor([[4., 6., 24., 16.], [40., 5., 60., 30.]]))
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (2, h1, w1)
    poly = t["masks"][0].numpy()
    assert poly[7:15, 5:23].all() and poly[31:35, 31:35].all()  # both parts, inside
    assert poly[20:29].sum() == 0 and poly[:, 40:].sum() == 0 and poly[:4].sum() == 0
    assert abs(int(poly.sum()) - (20 * 10 + 6 * 6)) <= 40  # rasterised edges only
    np.testing.assert_array_equal(t["masks"][1].numpy(), m_list)  # uncompressed RLE: exact
    assert t["area"].tolist() == [1.0, float(m_list.sum())]  # the json's area, as given

    image2, t2 = ds[1]  # JPEG, portrait; the crowd box is not a target
    assert image2.shape == (3, h2, w2) and 0 <= image2.min() and image2.max() <= 1
    assert t2["ann_ids"].tolist() == [12]
    np.testing.assert_array_equal(t2["masks"][0].numpy(), m_str)  # compressed RLE: exact

    image3, t3 = ds[2]  # no annotations: kept in eval mode, empty target
    assert t3["boxes"].shape == (0, 4) and t3["masks"].shape == (0, 20, 20)
    assert t3["labels"].dtype == torch.int64

    train = CocoDetection(a, d, train=True, min_size=10)
    assert train.image_ids == [1, 2] and train.report.images_filtered == 1
    assert CocoDetection(a, d, train=True, min_size=32).image_ids == [1]  # 30 px wide: out
    boxes_only = CocoDetection(a, d, with_masks=False)
    assert "masks" not in boxes_only[0][1]

    gt = ds.coco  # evaluation ground truth: everything in the file, crowd included
    assert sorted(gt.getAnnIds()) == [10, 11, 12, 13] and gt.getCatIds() == [1, 3]
    np.testing.assert_array_equal(gt.annToMask(gt.anns[12]), m_str)

    images, targets = collate([ds[0], ds[1]])
    assert isinstance(images, list) and len(images) == 2 and targets[1]["image_id"] == 2


def test_hflip_and_random_flip(tmp_path):
    m = rect_mask(10, 16, 2, 3, 7, 9)
    target = {"boxes": torch.tensor([[2., 3., 7., 9.]]), "masks": torch.from_numpy(m)[None],
              "labels": torch.tensor([1])}
    image = torch.arange(3 * 10 * 16, dtype=torch.float32).reshape(3, 10, 16)
    fi, ft = hflip(image, target)
    assert torch.equal(fi, image.flip(-1))
    assert torch.equal(ft["masks"][0], target["masks"][0].flip(-1))
    ys, xs = np.nonzero(ft["masks"][0].numpy())
    assert ft["boxes"].tolist() == [[xs.min(), 3., xs.max() + 1, 9.]] == [[9., 3., 14., 9.]]
    assert target["boxes"].tolist() == [[2., 3., 7., 9.]]  # the input is left alone
    always, never = RandomHorizontalFlip(1.0), RandomHorizontalFlip(0.0)
    assert torch.equal(always(image, target, 0)[0], fi) and never(image, target, 0)[0] is image
    flip = RandomHorizontalFlip(0.5, seed=3)
    coins = [flip(image, target, i)[0] is not image for i in range(200)]
    assert coins == [RandomHorizontalFlip(0.5, seed=3)(image, target, i)[0] is not image
                     for i in range(200)]
    assert 70 < sum(coins) < 130
    flip.set_epoch(1)
    assert [flip(image, target, i)[0] is not image for i in range(200)] != coins


# ------------------------------------------------------------------ bad input

def test_bad_json_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found.*nothere.json"):
        CocoDetection(tmp_path / "nothere.json", tmp_path)
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(DataError, match="broken.json is not valid json"):
        CocoDetection(p, tmp_path)
    p.write_text("[1, 2]")
    with pytest.raises(DataError, match="broken.json.*top level is a list"):
        CocoDetection(p, tmp_path)
    for key in ("images", "annotations", "categories"):
        d = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
        del d[key]
        p.write_text(json.dumps(d))
        with pytest.raises(DataError, match=f"broken.json.*'{key}' is missing"):
            CocoDetection(p, tmp_path)


@pytest.mark.parametrize("bad,match", [
    (ann(7, 1, [1, 1, 5, 5], cat=2), r"annotation 7 has category_id 2, which is not among"),
    (ann(7, 9, [1, 1, 5, 5]), r"annotation 7 refers to image_id 9"),
    (ann(7, 1, [1, 1, 5]), r"annotation 7 has bbox \[1, 1, 5\]"),
    (ann(7, 1, ["x", 1, 5, 5]), r"annotation 7 has bbox"),
    (ann(5, 1, [1, 1, 5, 5]), r"annotation id 5 is listed twice"),
    (ann(7, [1], [1, 1, 5, 5]), r"annotation 7 has image_id \[1\], not an integer id"),
    ({"id": 7, "image_id": 1, "bbox": [1, 1, 5, 5]}, r"annotation 7 has no 'category_id'"),
])
def test_bad_annotations_raise_with_json_and_id(tmp_path, bad, match):
    a, d = write_set(tmp_path, [img(1, 16, 16)], [ann(5, 1, [1, 1, 5, 5]), bad])
    with pytest.raises(DataError, match="instances_val2017.json: " + match):
        CocoDetection(a, d)


def test_bad_image_entries_raise(tmp_path):
    a, d = write_set(tmp_path, [img(1, 16, 16), {"id": 2, "file_name": "x.png", "width": 0,
                                                 "height": 5}], [])
    with pytest.raises(DataError, match=r"instances_val2017.json: image 2 \(x.png\) has no "
                                        r"positive integer"):
        CocoDetection(a, d)


def test_unusable_annotations_are_skipped_counted_and_logged_once(tmp_path, caplog):
    h, w = 20, 30
    ok_mask = rect_mask(h, w, 2, 2, 8, 8)
    bad_sum = rle_list(ok_mask)
    bad_sum["counts"] = bad_sum["counts"][:-1]  # runs no longer cover H*W
    anns = [
        ann(1, 1, [2, 2, 6, 6], seg=rect_poly(2, 2, 8, 8)),                         # fine
        ann(2, 1, [2, 2, 0, 6], seg=rect_poly(2, 2, 8, 8)),                         # zero width
        ann(3, 1, [2, 2, 6, -3], seg=rect_poly(2, 2, 8, 8)),                        # negative h
        ann(4, 1, [40, 2, 6, 6], seg=rect_poly(2, 2, 8, 8)),                        # outside
        ann(5, 1, [2, 2, 6, 6], seg=rect_poly(2, 2, 8, 8), area=0),                 # area 0
        ann(6, 1, [2, 2, 6, 6], seg=[]),                                            # empty polygon
        ann(7, 1, [2, 2, 6, 6], seg=[[2, 2, 8, 8]]),                                # 2 points
        ann(8, 1, [2, 2, 6, 6], seg=[[2, 2, 8, 2, 8]]),                             # odd count
        ann(9, 1, [2, 2, 6, 6], seg=rle_str(np.ones((h + 1, w)))),                  # RLE size
        ann(10, 1, [2, 2, 6, 6], seg=bad_sum),                                      # RLE sum
        ann(11, 1, [2, 2, 6, 6], seg={"size": [h, w], "counts": "\x7f\x7f"}),       # not a code
        ann(12, 1, [2, 2, 6, 6]),                                                   # no segm
        ann(13, 1, [25, 15, 10, 10], seg=rect_poly(25, 15, 30, 20)),                # clipped
        ann(14, 1, [2, 2, 6, 6], seg=rect_poly(2, 2, 8, 8) + [[1, 2, 3, 4]]),       # a bad part
        ann(15, 2, [1, 1, 0.5, 5], seg=rect_poly(1, 1, 2, 6)),                      # under 1 px
    ]
    a, d = write_set(tmp_path, [img(1, w, h), img(2, w, h)], anns)
    with caplog.at_level(logging.WARNING, logger="transnext.det"):
        ds = CocoDetection(a, d)
    r = ds.report
    assert r.skipped == {ZERO_SIZE: [2, 3, 15], OUTSIDE: [4], ZERO_AREA: [5],
                         BAD_POLY: [6, 7, 8], BAD_RLE: [9, 10, 11], NO_SEGM: [12]}
    assert r.n_skipped == 12 and r.clipped == [13] and r.parts_dropped == [14]
    logs = [rec.getMessage() for rec in caplog.records if rec.name == "transnext.det"]
    assert len(logs) == 1 and logs[0] == r.summary()
    assert logs[0].startswith("instances_val2017.json: skipped 12 annotations (3 zero-size box")
    assert "ids 2, 3, 15" in logs[0] and "3 invalid RLE: ids 9, 10, 11" in logs[0]
    assert "clipped 1 box(es) to their image (id 13)" in logs[0]

    t = ds[0][1]
    assert t["ann_ids"].tolist() == [1, 13, 14]
    assert t["boxes"][1].tolist() == [25., 15., 30., 20.]  # 35 x 25 clipped to 30 x 20
    np.testing.assert_array_equal(t["masks"][2].numpy(), t["masks"][0].numpy())  # bad part gone
    train = CocoDetection(a, d, train=True, min_size=1)
    assert train.image_ids == [1] and train.report.images_filtered == 1

    # evaluation keeps the file's boxes as they are, but not unusable segmentations
    assert sorted(r.eval_dropped) == [6, 7, 8, 9, 10, 11, 12]
    assert sorted(ds.coco.getAnnIds()) == [1, 2, 3, 4, 5, 13, 14, 15]
    assert ds.coco.anns[14]["segmentation"] == rect_poly(2, 2, 8, 8)
    # without masks, segmentations do not matter
    boxes_only = CocoDetection(a, d, with_masks=False)
    assert boxes_only[0][1]["ann_ids"].tolist() == [1, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert len(boxes_only.coco.getAnnIds()) == 15


def test_rle_string_decoder_matches_pycocotools():
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (7, 5), (40, 33), (200, 150)]:
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        m[: h // 2, : w // 3] = 1  # long runs too (multi-character numbers)
        enc = mask_utils.encode(np.asfortranarray(m))["counts"]
        assert rle_string_counts(enc) == rle_list(m)["counts"]
    assert rle_string_counts("") == []
    assert rle_string_counts("\x7f") is None and rle_string_counts("o") is None  # cut short


def test_missing_corrupt_and_mis_sized_images(tmp_path):
    anns = [ann(i, i, [1, 1, 4, 4], seg=rect_poly(1, 1, 5, 5)) for i in range(1, 6)]
    a, d = write_set(tmp_path, [img(i, 12, 10) for i in range(1, 6)], anns)
    (d / "002.png").unlink()
    (d / "003.png").write_bytes(b"this is not a png")
    Image.fromarray(np.zeros((10, 13, 3), np.uint8)).save(d / "004.png")
    data = (d / "005.png").read_bytes()
    (d / "005.png").write_bytes(data[: len(data) // 2])  # truncated: header still fine
    ds = CocoDetection(a, d)
    assert ds[0][0].shape == (3, 10, 12)
    with pytest.raises(DataError, match=r"image file not found: .*002.png \(image id 2"):
        ds[1]
    with pytest.raises(DataError, match=r"cannot read image .*003.png \(image id 3\)"):
        ds[2]
    with pytest.raises(DataError, match=r"004.png \(image id 4\) is 13x10 but .* says 12x10"):
        ds[3]
    with pytest.raises(DataError, match=r"005.png \(image id 5\): corrupt or truncated"):
        ds[4]
    with pytest.raises(DataError) as e:
        ds.check_images()
    msg = str(e.value)
    assert msg.startswith("3 of 5 images of instances_val2017.json")
    assert "002.png (id 2): not found" in msg and "003.png (id 3): unreadable" in msg
    assert "004.png (id 4): 13x10, the json says 12x10" in msg and "005.png" not in msg
    with pytest.raises(DataError, match=r"^4 of 5 images.*005.png \(id 5\): unreadable"):
        ds.check_images(decode=True)


# ------------------------------------------------------------------ sampler

def test_grouped_batches_ddp_exactly_once_and_deterministic():
    sizes = [(10, 20)] * 7 + [(20, 10)] * 6 + [(15, 15)] * 4  # 7 landscape, 10 others
    one = GroupedBatchSampler(sizes, 3, seed=5)
    batches = list(one)
    assert len(batches) == len(one) == 3 + 4
    for b in batches:
        assert len({sizes[i][1] > sizes[i][0] for i in b}) == 1  # one aspect group per batch
    assert sorted(i for b in batches for i in b) == list(range(17))
    assert list(GroupedBatchSampler(sizes, 3, seed=5)) == batches
    one.set_epoch(1)
    assert list(one) != batches and sorted(i for b in one for i in b) == list(range(17))

    for world in (2, 3, 4):  # 7 batches: not a multiple of 2, 3 or 4
        ranks = [GroupedBatchSampler(sizes, 3, seed=5, num_replicas=world, rank=r)
                 for r in range(world)]
        per_rank = [list(s) for s in ranks]
        assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0])
        seen = sorted(i for p in per_rank for b in p for i in b)
        assert seen == list(range(17)), world  # every image exactly once, by splitting batches
        for p in per_rank:
            for b in p:
                assert 1 <= len(b) <= 3 and len({sizes[i][1] > sizes[i][0] for i in b}) == 1

    tiny = [GroupedBatchSampler([(5, 5)] * 3, 2, num_replicas=4, rank=r) for r in range(4)]
    got = [list(s) for s in tiny]
    assert all(len(g) == 1 for g in got)  # 3 images, 4 ranks: one repeat is unavoidable
    flat = [i for g in got for b in g for i in b]
    assert len(flat) == 4 and sorted(set(flat)) == [0, 1, 2]

    drop = GroupedBatchSampler(sizes, 3, drop_last=True)
    assert len(list(drop)) == len(drop) == 2 + 3
    ordered = list(GroupedBatchSampler(sizes, 3, shuffle=False))
    assert ordered[0] == [7, 8, 9] and ordered[-1] == [6]


def test_dataloader_with_grouped_batches(tmp_path):
    images = [img(i, 24, 16) for i in range(1, 6)] + [img(i, 16, 24) for i in range(6, 9)]
    anns = [ann(i, i, [1, 1, 6, 6], seg=rect_poly(1, 1, 7, 7)) for i in range(1, 9)]
    a, d = write_set(tmp_path, images, anns)
    ds = CocoDetection(a, d, train=True, min_size=1, transform=RandomHorizontalFlip(0.5))
    sampler = GroupedBatchSampler(ds.sizes, 2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    seen = []
    for imgs, targets in loader:
        assert len({tuple(x.shape) for x in imgs}) == 1  # one aspect group: one size here
        assert all(t["masks"].shape[1:] == x.shape[1:] for x, t in zip(imgs, targets))
        seen += [t["image_id"] for t in targets]
    assert sorted(seen) == list(range(1, 9))


# ------------------------------------------------------------------ COCO AP

def ap_set(root: Path):
    """Two 128x128 images; categories 1 ('a') and 3 ('b'); 40x40 ground-truth boxes
    (medium area) with exact rectangle masks (compressed RLE)."""
    gts = [(1, 1, (10, 10, 50, 50)), (2, 1, (60, 10, 100, 50)),    # g1, g2 on image 1
           (3, 2, (10, 10, 50, 50)), (4, 2, (60, 60, 100, 100))]   # g3 (cat 1), g5 (cat 3)
    anns = [ann(aid, iid, [x0, y0, x1 - x0, y1 - y0], cat=3 if aid == 4 else 1,
                seg=rle_str(rect_mask(128, 128, x0, y0, x1, y1)), area=1600.0)
            for aid, iid, (x0, y0, x1, y1) in gts]
    return write_set(root, [img(1, 128, 128), img(2, 128, 128, "jpg")], anns)


def ap_outputs():
    """d1 = g1 (IoU 1, score .9), d4 = g2 shifted 12 px (IoU 28/52 = .538, score .6) on
    image 1; on image 2, d2 (score .8) hits nothing, d3 = g3 shifted 6 px (IoU 34/46 =
    .739, score .7), d5 = g5 (label 2 = category 3, IoU 1, score .5). Image 1's masks are
    float probabilities (n, 1, H, W), image 2's bool (n, H, W)."""
    def out(boxes, scores, labels, prob):
        masks = np.stack([rect_mask(128, 128, *b) for b in boxes]).astype(bool)
        m = torch.from_numpy(masks)
        if prob:
            m = (m.float() * 0.8 + 0.1)[:, None]
        return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
                "labels": torch.tensor(labels), "masks": m}
    return {1: out([(10, 10, 50, 50), (72, 10, 112, 50)], [0.9, 0.6], [1, 1], True),
            2: out([(80, 80, 120, 120), (16, 10, 56, 50), (60, 60, 100, 100)], [0.8, 0.7, 0.5],
                   [1, 1, 2], False)}


# Category a, 3 ground truths, detections by score: d1 TP, d2 FP, d3 TP if IoU thr <= .70,
# d4 TP only at .50. COCOeval: 101 recall points 0, .01, ..., 1; recall 1/3 covers 34 of
# them (0 .. .33), 2/3 the next 33, 1 the last 34; precision made non-increasing.
#   thr .50:      TP FP TP TP: recall 1/3 1/3 2/3 1, precision 1 .5 .667 .75 -> 1 .75 .75 .75
#                 AP = (34 * 1 + 33 * .75 + 34 * .75) / 101 = 84.25 / 101
#   thr .55-.70:  TP FP TP FP -> precision 1 2/3 2/3 .5 up to recall 2/3:
#                 AP = (34 + 33 * 2/3) / 101 = 56 / 101   (4 thresholds)
#   thr .75-.95:  only d1: AP = 34 / 101                   (5 thresholds)
#   AP(a) = (84.25 + 4 * 56 + 5 * 34) / 1010 = 478.25 / 1010; AP(b) = 1 at every threshold
#   AR(a) = (1 + 4 * 2/3 + 5 * 1/3) / 10 = 8/15;           AR(b) = 1
AP_A = 478.25 / 1010
EXPECTED = {
    "AP": (AP_A + 1) / 2 * 100,                    # 73.6757
    "AP50": (84.25 / 101 + 1) / 2 * 100,          # 91.7079
    "AP75": (34 / 101 + 1) / 2 * 100,             # 66.8317
    "APm": (AP_A + 1) / 2 * 100,                   # every box is medium (40 x 40)
    "AR@100": (8 / 15 + 1) / 2 * 100,             # 76.6667
    "AR@300": (8 / 15 + 1) / 2 * 100, "AR@1000": (8 / 15 + 1) / 2 * 100,
    "ARm@1000": (8 / 15 + 1) / 2 * 100,
}


def check_expected(metrics):
    for t in ("bbox", "segm"):
        for k, v in EXPECTED.items():
            assert metrics[t][k] == pytest.approx(v, abs=1e-4), (t, k)
        for k in ("APs", "APl", "ARs@1000", "ARl@1000"):  # no small or large ground truth
            assert np.isnan(metrics[t][k]), (t, k)


def test_coco_ap_hand_computed_bbox_and_segm(tmp_path, capsys):
    a, d = ap_set(tmp_path)
    ds = CocoDetection(a, d)
    ev = CocoEvaluator(ds.coco, ds.label_to_cat_id)
    ev.update(ap_outputs())
    metrics = ev.summarize()
    assert capsys.readouterr().out == ""  # COCOeval's printout is kept, not printed
    assert "maxDets=1000" in ev.text["bbox"]
    check_expected(metrics)
    table = format_table(metrics).splitlines()
    assert table[1].split()[:4] == ["bbox", "73.7", "91.7", "66.8"] and table[2].startswith("segm")
    per_class = ev.per_class_ap("segm")
    assert per_class["a"] == pytest.approx(AP_A * 100) and per_class["b"] == pytest.approx(100)

    # the result files: xywh boxes, str RLE counts; evaluating them gives the same numbers
    paths = ev.write_results(tmp_path / "out" / "results")
    assert sorted(p.name for p in paths.values()) == ["results.bbox.json", "results.segm.json"]
    bbox = json.loads(paths["bbox"].read_text())
    segm = json.loads(paths["segm"].read_text())
    assert len(bbox) == len(segm) == 5
    assert bbox[1] == {"image_id": 1, "category_id": 1, "bbox": [72.0, 10.0, 40.0, 40.0],
                       "score": pytest.approx(0.6)}
    assert [b["category_id"] for b in bbox] == [1, 1, 1, 1, 3]
    assert isinstance(segm[0]["segmentation"]["counts"], str)
    for t, p in paths.items():
        again, _, _ = run_cocoeval(ds.coco, p, t, ev.img_ids)
        assert again == pytest.approx(metrics[t], nan_ok=True)
    gt = COCO(str(a))  # and pycocotools reads them by itself
    assert len(gt.loadRes(str(paths["segm"])).getAnnIds()) == 5


def test_coco_ap_empty_results_and_bad_outputs(tmp_path):
    a, d = ap_set(tmp_path)
    ds = CocoDetection(a, d)
    ev = CocoEvaluator(ds.coco)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
             "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 1, 128, 128)}
    ev.update({1: empty, 2: empty})
    m = ev.summarize()
    for t in ("bbox", "segm"):
        assert m[t]["AP"] == m[t]["AP50"] == m[t]["AR@100"] == m[t]["APm"] == 0.0
        assert np.isnan(m[t]["APs"])
    paths = ev.write_results(tmp_path / "empty")
    assert json.loads(paths["bbox"].read_text()) == []
    with pytest.raises(ValueError, match="no images were evaluated"):
        CocoEvaluator(ds.coco).summarize()
    out = ap_outputs()[1]
    with pytest.raises(ValueError, match="image id 7 is not in the ground truth"):
        CocoEvaluator(ds.coco).update({7: out})
    with pytest.raises(ValueError, match="label 3 is not one of the 2 classes"):
        CocoEvaluator(ds.coco).update({1: dict(out, labels=torch.tensor([1, 3]))})
    with pytest.raises(ValueError, match="masks are 64x128 but the image is 128x128"):
        CocoEvaluator(ds.coco).update({1: dict(out, masks=out["masks"][..., :64])})
    boxes_only = CocoEvaluator(ds.coco, iou_types=("bbox",))
    boxes_only.update({i: {k: v for k, v in o.items() if k != "masks"}
                       for i, o in ap_outputs().items()})
    assert set(boxes_only.summarize()) == {"bbox"}


def test_merge_counts_each_image_once(tmp_path):
    a, d = ap_set(tmp_path)
    coco = CocoDetection(a, d).coco
    outs = ap_outputs()
    r0, r1 = CocoEvaluator(coco), CocoEvaluator(coco)
    r0.update({1: outs[1]})
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
             "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 128, 128)}
    r1.update({2: outs[2], 1: empty})  # image 1 again (padding), with other outputs
    r0.merge(r1)
    assert r0.img_ids == [1, 2]
    check_expected(r0.summarize())


def _gather_worker(rank, world, port, json_path, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        ds = CocoDetection(json_path, Path(json_path).parent.parent / "val2017")
        ev = CocoEvaluator(ds.coco, ds.label_to_cat_id)
        outs = ap_outputs()
        if rank == 0:
            ev.update({1: outs[1]})
        else:  # a padded DistributedSampler: image 1 again on rank 1, here without detections
            ev.update({2: outs[2], 1: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                       "labels": torch.zeros(0, dtype=torch.int64),
                                       "masks": torch.zeros(0, 128, 128, dtype=torch.bool)}})
        ev.gather()
        res = {"img_ids": ev.img_ids, "metrics": ev.summarize()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def test_gather_two_process_gloo(tmp_path):
    a, _ = ap_set(tmp_path)
    torch.multiprocessing.spawn(_gather_worker, args=(2, free_port(), str(a), str(tmp_path)),
                                nprocs=2)
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["img_ids"] == [1, 2]
        check_expected(res["metrics"])


# ------------------------------------------------------------------ mosaics

def test_instance_split_masks_boxes_areas_agree_with_the_pixels(tmp_path):
    """Solid items (28x28 of 200): each item is one flat colour 200 x its tint, the
    background stays under 100, so the written PNG shows every visible item pixel."""
    from transnext.tasks.detection.mosaics import write_instance_split
    items = torch.full((10, 28, 28), 200, dtype=torch.uint8)
    labels = torch.arange(10)
    info = write_instance_split(tmp_path, "val", 12, items, labels, np.random.default_rng(0),
                                size=96, items=(3, 5), scale=(1.0, 2.0), max_overlap=None,
                                min_visible=0.0, min_pixels=1)
    ds = CocoDetection(*resolve_coco(tmp_path, "val"))
    assert len(ds) == 12 and info["instances"] == sum(ds.num_instances(i) for i in range(12))
    assert ds.class_names[0] == "T-shirt/top" and ds.cat_ids == list(range(1, 11))
    coco = COCO(str(tmp_path / "annotations" / "instances_val2017.json"))  # pycocotools reads it
    overlapped = 0
    for i in range(len(ds)):
        image, t = ds[i]
        pix = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.int64)
        bright = pix.max(-1) > 100
        masks = t["masks"].numpy().astype(bool)
        union = masks.any(0)
        assert masks.sum(0).max() <= 1  # visible parts do not overlap
        np.testing.assert_array_equal(union, bright)  # nothing visible is left out here
        for k, m in enumerate(masks):
            colours = np.unique(pix[m], axis=0)
            assert len(colours) == 1  # one item's pixels
            same = (pix == colours[0]).all(-1)
            np.testing.assert_array_equal(same, m)  # and all of them
            ys, xs = np.nonzero(m)
            assert t["boxes"][k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert t["area"][k] == m.sum()
            overlapped += int(m.sum() < (t["boxes"][k][2] - t["boxes"][k][0]) *
                              (t["boxes"][k][3] - t["boxes"][k][1]))
            aid = int(t["ann_ids"][k])
            np.testing.assert_array_equal(coco.annToMask(coco.anns[aid]), m)
            assert coco.anns[aid]["iscrowd"] == 0
    assert overlapped > 0  # occlusion happened, so visible masks were tested

    # a high visibility bar leaves (nearly) hidden items out
    info2 = write_instance_split(tmp_path / "strict", "val", 12, items, labels,
                                 np.random.default_rng(0), size=96, items=(3, 5),
                                 scale=(1.0, 2.0), max_overlap=None, min_visible=0.95)
    assert info2["items_hidden"] > 0
    assert info2["instances"] + info2["items_hidden"] == info["instances"] + info["items_hidden"]


def test_mosaic_instances_match_the_semantic_map():
    from transnext.tasks.common.mosaic import make_mosaic
    rng = np.random.default_rng(1)
    items = torch.from_numpy(rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, 20))
    for _ in range(5):
        m = make_mosaic(rng, items, labels, size=64)
        np.testing.assert_array_equal(m.instances > 0, m.mask > 0)
        for k, (cls, _) in enumerate(m.items, start=1):
            assert (m.mask[m.instances == k] == cls + 1).all()
        assert len(m.item_pixels) == len(m.items)


@needs_fmnist
def test_fashion_mnist_instance_mosaics_deterministic_and_learnable_format(tmp_path):
    from transnext.tasks.detection.mosaics import write_instance_mosaics
    a = write_instance_mosaics(tmp_path / "a", n_train=6, n_val=4, size=96, seed=3)
    b = write_instance_mosaics(tmp_path / "b", n_train=6, n_val=4, size=96, seed=3)
    c = write_instance_mosaics(tmp_path / "c", n_train=6, n_val=4, size=96, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 12
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "val2017/00000.png").read_bytes() != (c / "val2017/00000.png").read_bytes()
    train = CocoDetection(*resolve_coco(a, "train"), train=True)
    val = CocoDetection(*resolve_coco(a, "val"))
    assert len(train) == 6 and len(val) == 4 and train.report.summary() == ""
    for ds in (train, val):
        for i in range(len(ds)):
            image, t = ds[i]
            assert image.shape == (3, 96, 96) and 1 <= len(t["labels"]) <= 4
            assert ((t["labels"] >= 1) & (t["labels"] <= 10)).all()
            side = torch.maximum(t["boxes"][:, 2] - t["boxes"][:, 0],
                                 t["boxes"][:, 3] - t["boxes"][:, 1])
            assert (side <= 70).all()
    # the ground truth as detections scores 100 (the format is what COCOeval expects)
    ev = CocoEvaluator(val.coco, val.label_to_cat_id)
    for i in range(len(val)):
        t = val[i][1]
        ev.update({t["image_id"]: {"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])),
                                   "labels": t["labels"], "masks": t["masks"].bool()}})
    m = ev.summarize()
    assert m["bbox"]["AP"] == pytest.approx(100) and m["segm"]["AP"] == pytest.approx(100)
