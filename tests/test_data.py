"""Data: Caffe ImageSegData transforms, readers' errors, list files, sampler, SBD converter, synthetic set."""
import os

import cv2
import numpy as np
import pytest
import torch

from attnscale.data import (MEAN_BGR, FileSource, ResumableSampler, SegDataset, SyntheticSource,
                            TransformConfig, make_loader, make_sample, read_image, read_label,
                            read_list, transform_test, transform_train, write_list)
from attnscale.data.transforms import crop_pair, finish_image, network_input
from attnscale.data import sbd


class FixedRng:
    """Stands in for numpy's Generator: integers() returns scripted values (mirror, h_off, w_off)."""

    def __init__(self, ints, uniform=1.0):
        self.ints, self.u = list(ints), uniform

    def integers(self, n):
        v = self.ints.pop(0)
        assert 0 <= v < n, (v, n)
        return v

    def uniform(self, lo, hi):
        return self.u


def _pair(h, w, seed=0):
    r = np.random.default_rng(seed)
    img = r.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    lab = r.integers(0, 21, size=(h, w), dtype=np.uint8)
    lab[0, :] = 255
    return img, lab


def test_mean_subtraction_is_bgr_per_channel_and_chw():
    img, lab = _pair(6, 7)
    x, y = transform_train(img, lab, TransformConfig(crop_size=0, mirror=False), FixedRng([]))
    assert x.shape == (3, 6, 7) and x.dtype == np.float32 and y.dtype == np.uint8
    for c in range(3):
        np.testing.assert_allclose(x[c], img[:, :, c].astype(np.float64) - MEAN_BGR[c], rtol=0, atol=1e-4)
    assert MEAN_BGR == (104.008, 116.669, 122.675)
    np.testing.assert_array_equal(y, lab)


def test_mean_subtraction_is_float32_like_caffe():
    """Caffe: ``Dtype pixel = data[i]; out = (pixel - mean_values_[c]) * scale`` with Dtype and the
    mean (a proto float) in float32.  Every (pixel value, channel) pair, train and test transforms and
    preprocess_bgr alike, bit for bit; a float64 subtraction differs for about 40 % of them."""
    from attnscale.caffe import preprocess_bgr
    img = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)   # 256 x 1 x 3
    lab = np.zeros((256, 1), np.uint8)
    want = np.stack([np.float32(np.arange(256, dtype=np.float32) - np.float32(m)) for m in MEAN_BGR])
    in64 = np.stack([(np.arange(256.0) - m).astype(np.float32) for m in MEAN_BGR])
    assert (want != in64).mean() > 0.3                     # the test can tell the two apart
    cfg = TransformConfig(crop_size=0, mirror=False)
    for x in (transform_train(img, lab, cfg, FixedRng([]))[0], transform_test(img, lab, cfg)[0],
              preprocess_bgr(img)[0].numpy()):
        np.testing.assert_array_equal(x[:, :, 0], want)
    scaled = transform_train(img, lab, TransformConfig(crop_size=0, mirror=False, scale=0.017), FixedRng([]))[0]
    np.testing.assert_array_equal(scaled[:, :, 0], want * np.float32(0.017))


def test_read_image_ignores_exif_orientation(tmp_path):
    """Caffe's OpenCV 2.4 decoded the stored grid; OpenCV >= 3.1's IMREAD_COLOR would rotate a JPEG
    tagged Orientation=6 (a 4x6 image read as 6x4, no longer matching its label)."""
    import struct
    img = np.zeros((4, 6, 3), np.uint8)
    img[:, :3] = 255
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    buf = buf.tobytes()
    tiff = (b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
            + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack(">I", 0))   # Orientation = 6
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\x00\x00" + tiff
    path = tmp_path / "tagged.jpg"
    path.write_bytes(buf[:2] + app1 + buf[2:])
    assert cv2.imread(str(path), cv2.IMREAD_COLOR).shape == (6, 4, 3)    # the tag is there and honoured
    got = read_image(str(path))
    assert got.shape == (4, 6, 3)
    assert got[:, :3].mean() > 200 and got[:, 3:].mean() < 50


def test_pad_bottom_right_with_mean_and_255():
    img, lab = _pair(5, 4)
    x, y = transform_train(img, lab, TransformConfig(crop_size=8, mirror=False), FixedRng([0, 0]))
    assert x.shape == (3, 8, 8) and y.shape == (8, 8)
    np.testing.assert_allclose(x[:, :5, :4], img.transpose(2, 0, 1) - np.array(MEAN_BGR)[:, None, None], atol=1e-4)
    assert np.all(x[:, 5:, :] == 0) and np.all(x[:, :, 4:] == 0)    # mean padding -> 0
    np.testing.assert_array_equal(y[:5, :4], lab)
    assert np.all(y[5:, :] == 255) and np.all(y[:, 4:] == 255)


def test_random_crop_offsets_and_mirror():
    img, lab = _pair(12, 15)
    cfg = TransformConfig(crop_size=5, mirror=True)
    # Caffe draws mirror first, then h_off, w_off
    x, y = transform_train(img, lab, cfg, FixedRng([0, 3, 7]))
    np.testing.assert_array_equal(y, lab[3:8, 7:12])
    np.testing.assert_allclose(x[0], img[3:8, 7:12, 0] - MEAN_BGR[0], atol=1e-4)
    xm, ym = transform_train(img, lab, cfg, FixedRng([1, 3, 7]))
    np.testing.assert_array_equal(ym, lab[3:8, 7:12][:, ::-1])
    np.testing.assert_allclose(xm, x[:, :, ::-1], atol=0)
    # extreme offsets are reachable: Rand(H - crop + 1)
    _, y2 = transform_train(img, lab, cfg, FixedRng([0, 7, 10]))
    np.testing.assert_array_equal(y2, lab[7:12, 10:15])


def test_ignore_label_survives_crop_mirror_and_scaling():
    img, lab = _pair(40, 40)
    lab[10:20, 10:20] = 255
    cfg = TransformConfig(crop_size=41, mirror=True, random_scale=(0.5, 1.5))
    rng = np.random.default_rng(3)
    for _ in range(5):
        x, y = transform_train(img, lab, cfg, rng)
        assert set(np.unique(y)) <= set(np.unique(lab))      # nearest neighbour: no blended labels
        assert (y == 255).any()
    x, y = transform_train(img, lab, TransformConfig(crop_size=0, mirror=False, random_scale=(0.5, 0.5)),
                           FixedRng([], uniform=0.5))
    assert y.shape == (20, 20)


def test_transform_test_centre_crop():
    img, lab = _pair(11, 9)
    x, y = transform_test(img, lab, TransformConfig(crop_size=5))
    np.testing.assert_array_equal(y, lab[3:8, 2:7])


def test_transform_size_mismatch_names_file():
    img, lab = _pair(5, 5)
    with pytest.raises(ValueError, match="foo.jpg"):
        transform_train(img, lab[:4], TransformConfig(crop_size=3), FixedRng([0, 0, 0]), name="foo.jpg")


def test_labels_leave_the_transforms_as_bytes():
    """Labels travel as uint8 (an eighth of int64's bytes through the loader, the pinned copy and the copy to
    the GPU); labels that do not fit a byte are refused, naming the file, and so is an ignore label > 255."""
    img, lab = _pair(5, 5)
    for wide in (lab.astype(np.int32), lab.astype(np.int64)):          # values that fit: the same bytes
        y = transform_test(img, wide, TransformConfig(crop_size=5))[1]
        assert y.dtype == np.uint8 and np.array_equal(y, lab)
    for bad in (300, -1):
        wide = lab.astype(np.int32)
        wide[2, 3] = bad
        with pytest.raises(ValueError, match=f"label of foo.png: its values must be 8-bit.*int32 in .*{bad}"):
            transform_train(img, wide, TransformConfig(crop_size=3), FixedRng([0, 0, 0]), name="foo.png")
    with pytest.raises(ValueError, match="label of foo.png: its values must be 8-bit.*float"):
        transform_test(img, lab.astype(np.float32), TransformConfig(crop_size=5), name="foo.png")
    with pytest.raises(ValueError, match="ignore_label 256 does not fit"):
        TransformConfig(ignore_label=256)


def test_crop_pair_records_where_the_image_lies():
    """The padding (bottom/right, then mirrored to the left) is recorded as ``valid`` = (rows, first column,
    end column), and finish_image puts Caffe's subtracted mean pixel (0) there."""
    img, lab = _pair(5, 4)
    cfg = TransformConfig(crop_size=6, mirror=True)
    x, y, valid = crop_pair(img, lab, cfg, FixedRng([0, 0, 0]))
    assert valid == (5, 0, 4) and x.dtype == np.uint8 and x.shape == (6, 6, 3)
    assert np.array_equal(x[:5, :4], img) and np.array_equal(y[:5, :4], lab) and (y[5] == 255).all()
    x, y, valid = crop_pair(img, lab, cfg, FixedRng([1, 0, 0]))                  # mirrored
    assert valid == (5, 2, 6) and np.array_equal(x[:5, 2:], img[:, ::-1]) and (y[:, :2] == 255).all()
    out = finish_image(x, valid, cfg)
    assert (out[:, 5] == 0).all() and (out[:, :, :2] == 0).all() and (out[:, :5, 2:] != 0).all()
    assert crop_pair(img, lab, TransformConfig(crop_size=3), None)[2] == (3, 0, 3)   # centre crop, no padding
    # a mirrored column of one pixel (crop 1, or no crop of a 1-wide image): numpy calls its negative stride
    # contiguous, torch.from_numpy refuses it; the dataset gets copies in positive strides
    src = SyntheticSource(2, seed=1, size=33)
    for tcfg in (TransformConfig(crop_size=1), TransformConfig(crop_size=0, random_scale=(0.03, 0.03))):
        for raw in (False, True):
            ds = SegDataset(src, tcfg, train=True, seed=0, raw=raw)
            for x, *_, y in (ds[(0, d)] for d in range(6)):       # mirrored draws among them
                assert y.shape[-1] == 1 and x.shape[-2 if raw else -1] == 1


def _bits(t):
    return t.contiguous().view(torch.int32)


def _same_input_as_the_worker(device):
    """SegDataset(raw=True) + network_input gives the float dataset's input bit for bit (+0.0 in the
    padding), in train (random scale: padded crops, mirrored ones) and test phase, with Caffe's scale."""
    src = SyntheticSource(8, seed=3, size=33)
    for train, tcfg, pads in ((True, TransformConfig(crop_size=37, random_scale=(0.6, 1.4)), True),
                              (True, TransformConfig(crop_size=25, scale=0.017), False),
                              (False, TransformConfig(crop_size=41), True)):
        keys = [(i, 11 * i + 1) for i in range(8)]
        ref = torch.stack([SegDataset(src, tcfg, train, seed=5)[k][0] for k in keys])
        raw = [SegDataset(src, tcfg, train, seed=5, raw=True)[k] for k in keys]
        images, valid = (torch.stack([r[j] for r in raw]).to(device) for j in (0, 1))
        assert images.dtype == torch.uint8 and valid.dtype == torch.int32
        padded = int((valid[:, 0] < images.shape[1]).sum() + (valid[:, 2] - valid[:, 1] < images.shape[2]).sum())
        assert (padded > 0) == pads
        if train:   # mirrored crops among them: their padding lies on the left
            assert 0 < int((valid[:, 1] > 0).sum()) or not pads
        for channels_last in (False, True):
            x = network_input(images, valid, tcfg, channels_last)
            assert x.shape == ref.shape and x.dtype == torch.float32 and x.device.type == device
            assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            assert torch.equal(_bits(x.cpu()), _bits(ref)), (train, tcfg)
        for r, k in zip(raw, keys):
            assert torch.equal(r[2], SegDataset(src, tcfg, train, seed=5)[k][1])


def test_raw_batches_become_the_same_network_input():
    _same_input_as_the_worker("cpu")
    class Floats(SyntheticSource):
        def load(self, i):
            img, lab, name = super().load(i)
            return img.astype(np.float32), lab, name
    with pytest.raises(ValueError, match=r"synthetic.*: the image is float32; SegDataset\(raw=True\) sends"):
        SegDataset(Floats(2, seed=1, size=33), TransformConfig(crop_size=5), raw=True)[0]
    tcfg = TransformConfig(crop_size=4)
    with pytest.raises(ValueError, match=r"images must be \(N, H, W, 3\) uint8, got torch.float32"):
        network_input(torch.zeros(1, 4, 4, 3), torch.zeros(1, 3, dtype=torch.int32), tcfg)
    with pytest.raises(ValueError, match=r"valid must be \(2, 3\) integers"):
        network_input(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.zeros(1, 3, dtype=torch.int32), tcfg)


@pytest.mark.cuda
def test_raw_batches_become_the_same_network_input_on_cuda():
    _same_input_as_the_worker("cuda")


class _ThreadCount(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, key):
        return torch.tensor(cv2.getNumThreads())


def test_loader_workers_run_opencv_on_one_thread():
    """Each loader worker decodes and resizes on one OpenCV thread (12 workers with an OpenCV pool of every
    core's size would compete with the training process); the main process keeps its own setting."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(4)          # what a forked worker would inherit, whatever this machine's core count
    try:
        got = [int(v) for b in zip(range(2), make_loader(_ThreadCount(), 2, workers=2)) for v in b[1]]
        assert got == [1] * 4
        assert cv2.getNumThreads() == 4
    finally:
        cv2.setNumThreads(before)


def _write_voc_like(root, n=3, size=(20, 24)):
    os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
    os.makedirs(os.path.join(root, "SegmentationClassAug"), exist_ok=True)
    names = []
    for i in range(n):
        img, lab = _pair(*size, seed=i)
        cv2.imwrite(os.path.join(root, "JPEGImages", f"im{i}.png"), img)   # lossless for the test
        cv2.imwrite(os.path.join(root, "SegmentationClassAug", f"im{i}.png"), lab)
        names.append(f"im{i}")
    lst = os.path.join(root, "list", "train.txt")
    write_list(lst, names, image_ext=".png")
    return lst, names


def test_file_source_reads_deeplab_list(tmp_path):
    root = str(tmp_path)
    lst, names = _write_voc_like(root)
    with open(lst) as f:
        assert f.readline().strip() == "/JPEGImages/im0.png /SegmentationClassAug/im0.png"
    src = FileSource(lst, root)
    assert len(src) == 3
    img, lab, name = src.load(1)
    ref_img, ref_lab = _pair(20, 24, seed=1)
    np.testing.assert_array_equal(img, ref_img)
    np.testing.assert_array_equal(lab, ref_lab)
    ds = SegDataset(src, TransformConfig(crop_size=16), train=True, seed=0)
    x, y = ds[(0, 5)]
    assert x.shape == (3, 16, 16) and y.dtype == torch.uint8


def test_bad_files_give_errors_naming_the_file(tmp_path):
    root = str(tmp_path)
    lst, names = _write_voc_like(root)
    bad_img = os.path.join(root, "JPEGImages", "im0.png")
    with open(bad_img, "wb") as f:
        f.write(b"not an image at all")
    with pytest.raises(ValueError, match="im0.png"):
        FileSource(lst, root).load(0)
    im1 = os.path.join(root, "JPEGImages", "im1.png")
    saved = open(im1, "rb").read()
    os.remove(im1)
    # found when the list is read (not when the sampler reaches it), naming the list line
    with pytest.raises(FileNotFoundError, match=r"train.txt:2: image file not found: .*im1.png"):
        FileSource(lst, root)
    with open(im1, "wb") as f:
        f.write(saved)
    # label size mismatch
    cv2.imwrite(os.path.join(root, "SegmentationClassAug", "im2.png"), np.zeros((7, 7), np.uint8))
    with pytest.raises(ValueError, match="im2.png.*im2.png|size mismatch"):
        FileSource(lst, root).load(2)
    # colour (palette-expanded) label
    p = os.path.join(str(tmp_path), "colour.png")
    cv2.imwrite(p, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="colour.png"):
        read_label(p)
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        read_image(os.path.join(root, "nope.jpg"))
    # malformed list line
    bad_list = os.path.join(root, "bad.txt")
    with open(bad_list, "w") as f:
        f.write("/a.jpg /a.png\n/b.jpg /b.png extra\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        read_list(bad_list, root)
    with pytest.raises(FileNotFoundError, match="missing_list.txt"):
        read_list(os.path.join(root, "missing_list.txt"))


def test_sampler_resumes_and_shards():
    full = ResumableSampler(10, seed=4)
    it = iter(full)
    first = [next(it) for _ in range(25)]
    it2 = iter(ResumableSampler(10, seed=4, start=13))
    assert [next(it2) for _ in range(12)] == first[13:]
    assert sorted(k[0] for k in first[:10]) == list(range(10))       # an epoch is a permutation
    assert [k[0] for k in first[:10]] != [k[0] for k in first[10:20]]  # reshuffled each epoch
    shards = []
    for r in range(3):
        s = iter(ResumableSampler(10, seed=4, rank=r, world=3))
        shards.append([next(s) for _ in range(4)])
    idx = sorted(k[0] for sh in shards for k in sh)
    assert set(idx) == set(range(10)) and len(idx) == 12               # padded like DistributedSampler
    draws = [k[1] for sh in shards for k in sh]
    assert len(set(draws)) == len(draws)


def test_loader_is_independent_of_worker_count():
    ds = SegDataset(SyntheticSource(6, seed=1, size=33), TransformConfig(crop_size=25), seed=2)
    a = [b for _, b in zip(range(4), make_loader(ds, 2, workers=0, seed=2))]
    b = [b for _, b in zip(range(4), make_loader(ds, 2, workers=2, seed=2))]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = [b for _, b in zip(range(2), make_loader(ds, 2, workers=0, seed=2, start_sample=4))]
    assert torch.equal(c[0][0], a[2][0]) and torch.equal(c[1][1], a[3][1])


def test_synthetic_is_deterministic_and_multi_scale():
    a_img, a_lab = make_sample(5, 3)
    b_img, b_lab = make_sample(5, 3)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(make_sample(5, 4)[1], a_lab)
    small = large = 0
    for i in range(10):
        _, lab = make_sample(0, i)
        assert set(np.unique(lab)) <= {0, 1, 2, 3, 4, 255}
        n, comp = cv2.connectedComponents(((lab > 0) & (lab < 255)).astype(np.uint8))
        areas = np.bincount(comp.ravel())[1:]
        small += int((areas < 150).sum())
        large += int((areas > 800).sum())
    assert small >= 20 and large >= 8


def _savemat_gtcls(path, seg):
    import scipy.io
    scipy.io.savemat(path, {"GTcls": {"Segmentation": seg.astype(np.uint8),
                                      "CategoriesPresent": np.unique(seg[seg > 0])}})


def test_sbd_converter_on_tiny_files(tmp_path):
    from PIL import Image
    sbd_dir = tmp_path / "sbd" / "dataset"
    (sbd_dir / "cls").mkdir(parents=True)
    voc = tmp_path / "VOC2012"
    (voc / "SegmentationClass").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    seg_a = np.zeros((6, 8), np.uint8)
    seg_a[1:4, 2:6] = 15
    seg_b = np.full((5, 5), 7, np.uint8)
    _savemat_gtcls(str(sbd_dir / "cls" / "a.mat"), seg_a)
    _savemat_gtcls(str(sbd_dir / "cls" / "b.mat"), seg_b)
    _savemat_gtcls(str(sbd_dir / "cls" / "v.mat"), np.ones((4, 4), np.uint8))   # VOC must win for v
    (sbd_dir / "train.txt").write_text("a\nv\n")
    (sbd_dir / "val.txt").write_text("b\n")
    voc_v = np.array([[0, 255, 3, 3], [0, 255, 3, 3], [0, 0, 255, 255], [12, 12, 12, 12]], np.uint8)
    im = Image.fromarray(voc_v, mode="P")
    im.putpalette([(i * 37) % 256 for i in range(768)])
    im.save(str(voc / "SegmentationClass" / "v.png"))
    im2 = Image.fromarray(np.zeros((3, 3), np.uint8), mode="P")
    im2.putpalette([0] * 768)
    im2.save(str(voc / "SegmentationClass" / "t.png"))
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("t\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("v\n")
    counts = sbd.convert(str(sbd_dir), str(voc), progress=False)
    assert counts == {"sbd": 3, "voc": 2, "train_aug": 3, "val": 1}
    out = voc / "SegmentationClassAug"
    np.testing.assert_array_equal(read_label(str(out / "a.png")), seg_a)
    np.testing.assert_array_equal(read_label(str(out / "b.png")), seg_b)
    np.testing.assert_array_equal(read_label(str(out / "v.png")), voc_v)     # palette indices, 255 kept
    assert (voc / "list" / "train_aug.txt").read_text().split("\n")[0] == \
        "/JPEGImages/a.jpg /SegmentationClassAug/a.png"
    assert [ln.split()[0] for ln in (voc / "list" / "train_aug.txt").read_text().split("\n") if ln] == \
        ["/JPEGImages/a.jpg", "/JPEGImages/b.jpg", "/JPEGImages/t.jpg"]
    assert (voc / "list" / "val.txt").read_text() == "/JPEGImages/v.jpg /SegmentationClassAug/v.png\n"


def test_sbd_bad_mat_names_file(tmp_path):
    import scipy.io
    p = str(tmp_path / "x.mat")
    scipy.io.savemat(p, {"other": np.zeros(3)})
    with pytest.raises(ValueError, match="x.mat"):
        sbd.load_sbd_mat(p)
    q = tmp_path / "y.mat"
    q.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="y.mat"):
        sbd.load_sbd_mat(str(q))


def test_label_values_are_checked_naming_file_and_line(tmp_path):
    """A label holding ids that are neither a class nor 255 is refused when loaded, naming the label
    file and its list line; training would otherwise see only the pixels label shrinking samples."""
    root = str(tmp_path)
    lst, _ = _write_voc_like(root)
    lab = cv2.imread(os.path.join(root, "SegmentationClassAug", "im1.png"), cv2.IMREAD_UNCHANGED)
    lab[1::2, 1::2] = 40
    cv2.imwrite(os.path.join(root, "SegmentationClassAug", "im1.png"), lab)
    FileSource(lst, root).load(1)                 # no class count: not checked
    src = FileSource(lst, root, num_classes=21)
    src.load(0)
    with pytest.raises(ValueError, match=r"im1.png \(.*train.txt:2\).*class id\(s\) \[40\] outside 0..20"):
        src.load(1)


def test_list_encoding_bom_and_latin1(tmp_path):
    p = tmp_path / "l.txt"
    p.write_bytes(b"\xef\xbb\xbf/a.jpg /a.png\n/b.jpg /b.png\n")
    assert read_list(str(p), "/data") == [("/data/a.jpg", "/data/a.png"), ("/data/b.jpg", "/data/b.png")]
    p.write_bytes(b"/a.jpg /a.png\n/caf\xe9.jpg /caf\xe9.png\n")
    with pytest.raises(ValueError, match=r"l.txt:2: not UTF-8"):
        read_list(str(p))
