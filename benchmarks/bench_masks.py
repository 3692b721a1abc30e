"""Step-1 throughput: proposals/s and images/s of the mask backends, measured side by side.

    python benchmarks/bench_masks.py [--images 8] [--tiny-points 8] [--vit-h-images 4]

* ``components`` (the shapes world's backend) and the tiny random-init SAM (segment-anything's real
  automatic mask generator; thresholds 0 and box NMS 1.0 so that random weights yield masks) on the same
  generated shapes-world images (128x128), on CPU;
* full-size ViT-H with random weights on 640x480 images when a GPU is present (the encoder's cost does not
  depend on the weights): once with the paper's settings (pred_iou_thresh 0.5, else the defaults: random
  weights keep few masks, so only images/s is meaningful) and once with thresholds 0 / NMS 1.0
  (proposals/s). Without a GPU it prints "no GPU: skipped".
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _time(backend, images, warmup=1):
    from ris_utils.masks import propose_masks

    for img in images[:warmup]:
        propose_masks(img, backend)
    t0 = time.perf_counter()
    n = sum(len(propose_masks(img, backend)) for img in images)
    dt = time.perf_counter() - t0
    return n, dt


def _report(name, n_props, n_images, dt):
    print(f"{name:<46} {n_images / dt:8.2f} images/s {n_props / dt:10.1f} proposals/s "
          f"{n_props / n_images:7.1f} proposals/image  ({n_images} images, {dt:.2f} s)")
    return n_props / dt


def main(argv=None) -> int:
    import torch

    from ris_utils import masks
    from ris_utils.data import shapes
    from ris_utils.images import load_image_rgb

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8, help="shapes-world images for the CPU backends")
    ap.add_argument("--tiny-points", type=int, default=8, help="points_per_side of the tiny SAM")
    ap.add_argument("--vit-h-images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        shapes.generate_world(Path(tmp), n_images={"train": args.images, "val": 1, "testA": 1, "testB": 1}, seed=0)
        files = sorted((Path(tmp) / "images").glob("*.png"))[: args.images]
        images = [load_image_rgb(f) for f in files]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, images {images[0].shape}")

    comp = masks.ComponentsSegmenter()
    r_comp = _report("components (CPU)", *_flip(_time(comp, images), len(images)))
    tiny = masks.build_sam_generator({"backend": "sam", "sam_variant": "tiny", "random_init": True, "device": "cpu",
                                      "amg": {"points_per_side": args.tiny_points, "pred_iou_thresh": 0.0,
                                              "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}})
    r_tiny = _report(f"tiny SAM, {args.tiny_points}x{args.tiny_points} points, thr 0 (CPU)",
                     *_flip(_time(tiny, images), len(images)))
    print(f"ratio components / tiny SAM (proposals/s): {r_comp / r_tiny:.2f}")

    if not torch.cuda.is_available():
        print("full-size ViT-H (random weights): no GPU: skipped")
        return 0
    rng = np.random.default_rng(0)
    big = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(args.vit_h_images)]
    for label, amg in [("paper settings (pred_iou 0.5)", {"pred_iou_thresh": 0.5}),
                       ("thresholds 0, box NMS 1.0", {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                                                      "box_nms_thresh": 1.0})]:
        gen = masks.build_sam_generator({"backend": "sam", "sam_variant": "vit_h", "random_init": True,
                                         "device": "cuda", "amg": amg})
        n, dt = _time(gen, big)
        torch.cuda.synchronize()
        _report(f"ViT-H random weights, {label} ({torch.cuda.get_device_name()})", n, len(big), dt)
        del gen
        torch.cuda.empty_cache()
    return 0


def _flip(res, n_images):
    n_props, dt = res
    return n_props, n_images, dt


if __name__ == "__main__":
    raise SystemExit(main())
