"""Geometry of the captioner's 4 views (ris_utils.crops) on hand-made masks."""

import numpy as np
import pytest
import torch

from ris_utils.crops import (
    PAPER_VIEWS,
    enlarge_box_xyxy,
    make_views,
    mask_box_xyxy,
    pad_to_square,
    view_crop,
)


def _image(h=40, w=60):
    # every pixel unique-ish: value encodes its position, so crops can be located exactly
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy * 5 % 256, xx * 4 % 256, (yy + xx) % 256], axis=-1).astype(np.uint8)


def test_box_and_enlargement():
    m = np.zeros((40, 60), bool)
    m[10:20, 5:25] = True
    m[12, 30] = True  # a stray pixel widens the tight box
    assert mask_box_xyxy(m) == (5, 10, 31, 20)
    assert enlarge_box_xyxy((5, 10, 25, 20), 1.0, 60, 40) == (5, 10, 25, 20)
    # width 20 -> 24 and height 10 -> 12 at x1.2, centred on (15, 15)
    assert enlarge_box_xyxy((5, 10, 25, 20), 1.2, 60, 40) == (3, 9, 27, 21)
    # x1.1: 22 x 11 (each edge moves by 1 / 0.5 pixel, rounded half up)
    x0, y0, x1, y1 = enlarge_box_xyxy((5, 10, 25, 20), 1.1, 60, 40)
    assert (x1 - x0, y1 - y0) == (22, 11) and (x0 + x1) / 2 == 15


def test_enlargement_clipped_at_border_not_shifted():
    # box touching the left and top border: enlarged box clipped to 0 there, grows on the other side only
    assert enlarge_box_xyxy((0, 0, 10, 20), 1.2, 60, 40) == (0, 0, 11, 22)
    # box touching the right/bottom border
    assert enlarge_box_xyxy((50, 30, 60, 40), 1.2, 60, 40) == (49, 29, 60, 40)


def test_views_content_and_square_padding():
    img = _image()
    m = np.zeros((40, 60), bool)
    m[10:20, 5:25] = True
    m[10, 5] = False  # one pixel of the box outside the mask
    masked = view_crop(img, m, "masked", fill=7)
    assert masked.shape == (20, 20, 3)
    # 20x10 crop centred vertically: rows 5..15 hold the image, the rest is fill
    assert (masked[:5] == 7).all() and (masked[15:] == 7).all()
    assert (masked[5:15, 1:] == img[10:20, 6:25]).all()
    assert (masked[5, 0] == 7).all()  # outside the mask -> fill
    crop = view_crop(img, m, 1.2, fill=(1, 2, 3))
    assert crop.shape == (24, 24, 3)
    assert (crop[6:18] == img[9:21, 3:27]).all()
    assert (crop[:6] == np.array([1, 2, 3], np.uint8)).all()
    crop10 = view_crop(img, m, 1.0, fill=0)
    assert (crop10[5:15] == img[10:20, 5:25]).all()  # the x1.0 view keeps pixels outside the mask
    sq = pad_to_square(np.zeros((3, 6, 3), np.uint8) + 9, 0)
    assert sq.shape == (6, 6, 3) and (sq[1:4] == 9).all() and (sq[0] == 0).all() and (sq[4:] == 0).all()


def test_make_views_batch_shape_and_normalisation():
    img = _image()
    masks = np.zeros((3, 40, 60), bool)
    masks[0, 10:20, 5:25] = True
    masks[1, 0:40, 50:60] = True  # touches three borders
    masks[2, 5:9, 5:9] = True
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    out = make_views(img, masks, PAPER_VIEWS, size=16, fill=0, mean=mean, std=std)
    assert out.shape == (3, 4, 3, 16, 16) and out.dtype == torch.float32
    # undo the normalisation: values back in [0, 1] and the padded corner equals the fill (0)
    raw = out * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert torch.allclose(raw[0, 0, :, 0, 0], torch.zeros(3), atol=1e-5)
    # single-view calls (step 3) give the same tensors as the slice of the full call
    only = make_views(img, masks, ("masked",), size=16, fill=0, mean=mean, std=std)
    assert torch.equal(only[:, 0], out[:, 0])
    # the "mean" fill normalises to exactly zero
    holed = masks[2].copy()
    holed[5, 5] = False  # the corner pixel of the box lies outside the mask -> filled
    mf = make_views(img, [holed], ("masked",), size=4, fill="mean", mean=mean, std=std)
    assert mf[0, 0, :, 0, 0].abs().max() < 0.02
    assert (view_crop(img, holed, "masked", fill="mean", mean=mean)[0, 0] == [128, 102, 76]).all()


def test_degenerate_masks():
    img = _image()
    empty = np.zeros((40, 60), bool)
    assert mask_box_xyxy(empty) is None
    blank = view_crop(img, empty, 1.2, fill=5)
    assert blank.shape == (1, 1, 3) and (blank == 5).all()
    one = np.zeros((40, 60), bool)
    one[0, 59] = True  # one pixel in the top-right corner
    for view in PAPER_VIEWS:
        c = view_crop(img, one, view, fill=0)
        assert c.shape == (1, 1, 3) and (c[0, 0] == img[0, 59]).all()
    out = make_views(img, [empty, one], size=8, fill=0, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.count_nonzero(out[0]) == 0  # empty mask -> fill only
    assert torch.allclose(out[1, 2, :, 3, 3], torch.tensor(img[0, 59] / 255.0, dtype=torch.float32))
    with pytest.raises(ValueError, match="mask shape"):
        view_crop(img, np.zeros((5, 5), bool), 1.0)
    with pytest.raises(ValueError, match="unknown view"):
        view_crop(img, one, "box")


def test_authors_box_is_their_off_by_one_crop():
    """box="authors": torchvision's masks_to_boxes (inclusive max) used as an exclusive box, enlarged and
    truncated as in distinctive_caption_generation.py l. 170-199 -- checked against torchvision itself."""
    import torch
    import torchvision.transforms.functional as TF
    from torchvision.ops import masks_to_boxes

    from ris_utils.crops import authors_box_xyxy

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    t = torch.from_numpy(img).permute(2, 0, 1)
    for k in range(40):
        m = np.zeros((37, 53), bool)
        y0, x0 = rng.integers(0, 35), rng.integers(0, 51)
        m[y0: y0 + rng.integers(2, 20), x0: x0 + rng.integers(2, 30)] = True
        b = masks_to_boxes(torch.from_numpy(m)[None].float())[0].tolist()
        for s in (1.0, 1.1, 1.2):
            w, h = s * (b[2] - b[0]), s * (b[3] - b[1])
            mx, my = (w - (b[2] - b[0])) / 2, (h - (b[3] - b[1])) / 2
            ex0, ey0 = max(b[0] - mx, 0.0), max(b[1] - my, 0.0)
            ex1, ey1 = min(b[2] + mx, 53), min(b[3] + my, 37)
            ref = TF.crop(t, int(ey0), int(ex0), int(ey1 - ey0), int(ex1 - ex0)).permute(1, 2, 0).numpy()
            ax0, ay0, ax1, ay1 = authors_box_xyxy(m, s, 53, 37)
            assert np.array_equal(img[ay0:ay1, ax0:ax1], ref), (k, s)
        # the scale-1 crops miss the mask's last row and column
        assert authors_box_xyxy(m, 1.0, 53, 37)[2:] == tuple(v - 1 for v in mask_box_xyxy(m)[2:])
        crop = view_crop(img, m, 1.0, box="authors")
        assert crop.shape[0] == max(mask_box_xyxy(m)[2] - mask_box_xyxy(m)[0], mask_box_xyxy(m)[3] - mask_box_xyxy(m)[1]) - 1
    one = np.zeros((37, 53), bool)
    one[5, 7] = True  # their crop would be empty; ours keeps the pixel
    assert authors_box_xyxy(one, 1.2, 53, 37) == (7, 5, 8, 6)
    with pytest.raises(ValueError, match="crop box"):
        view_crop(img, one, 1.0, box="inclusive")


def test_fill_authors_is_the_normalised_mean():
    """The authors fill the NORMALISED image with the mean: pixel 255 * mean * (1 + std)."""
    from ris_utils.crops import DEFAULT_MEAN, DEFAULT_STD, resolve_fill

    f = resolve_fill("authors", DEFAULT_MEAN, DEFAULT_STD)
    norm = (f / 255.0 - np.array(DEFAULT_MEAN)) / np.array(DEFAULT_STD)
    assert np.abs(norm - np.array(DEFAULT_MEAN)).max() < 0.5 / 255 / min(DEFAULT_STD)
    assert f.tolist() == [156, 147, 133]
