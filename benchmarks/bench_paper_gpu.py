"""Paper-scale GPU benchmark: full-size SAM ViT-H and CoCa ViT-L/14 with random weights (nothing downloaded).

    python benchmarks/bench_paper_gpu.py [--images 8] [--masks 2,10,30] [--mean-masks 10]
    python benchmarks/bench_paper_gpu.py --smoke      # tiny configs on CPU: checks the script, measures nothing

Measured side by side in one process, in fp32 and in bf16 autocast:

1. SAM ViT-H image encoder: images/s on 1024x1024 inputs (batch 1), peak GPU memory;
2. CoCa ViT-L/14 distinctive caption sampling: captions/s of one image's 4 views x 10 sample settings x N
   masks with our batched KV-cached decoder (``ris_utils.captioning.sample_captions``), and, as the
   no-KV-cache baseline, open_clip's own ``CoCa.generate`` (top-k sampling, the whole prefix recomputed at
   every step, as the authors' modified ``generate`` does) on the same crops; the ratio of the two rates;
3. the projected GPU-hours for the RefCOCO+ train images (16,994) =
   16,994 x (SAM encoder s/image + N̄ masks' captions s/image) / 3600 for ``--mean-masks`` N̄ (the AMG
   prompts and post-processing are timed by benchmarks/bench_masks.py).

Random weights: the compute of a forward pass does not depend on the weight values; caption lengths do, so
every caption is forced to the full ``seq_len`` (end-of-text banned until the last position), which makes
the numbers an upper bound per caption. Without a GPU (and without ``--smoke``) it prints
"no GPU: skipped" and exits 0. Append the printed table to benchmarks/RESULTS.md with the card's name.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

N_IMAGES_REFCOCO_PLUS_TRAIN = 16_994


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _timed(fn, device, repeats: int) -> float:
    """Seconds per call (after one warm-up call)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def _peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def bench_sam(device, precisions, repeats: int, smoke: bool) -> dict:
    """Seconds per image of the SAM image encoder per precision."""
    if smoke:
        from ris_utils.masks import build_sam_tiny

        sam, size = build_sam_tiny(), 256
    else:
        from segment_anything import sam_model_registry

        sam, size = sam_model_registry["vit_h"](checkpoint=None), 1024
    encoder = sam.to(device).eval().image_encoder
    x = torch.randn(1, 3, size, size, device=device)
    out = {}
    for name, dtype in precisions:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad(), _autocast(device, dtype):
            sec = _timed(lambda: encoder(x), device, repeats)
        out[name] = {"s_per_image": sec, "images_per_s": 1.0 / sec, "peak_gb": _peak_gb(device)}
        print(f"SAM {'tiny' if smoke else 'ViT-H'} encoder {name}: {1 / sec:8.2f} images/s  "
              f"peak {out[name]['peak_gb']:.1f} GB", flush=True)
    return out


def bench_coca(device, precisions, masks_list, views: int, seq_len: int, repeats: int, smoke: bool,
               baseline_masks: int) -> dict:
    """Captions/s of distinctive sampling (KV cache) and of open_clip's generate (no cache)."""
    import open_clip

    from ris_utils.captioning import CocaDecoder, TokenIds, parse_settings, row_key, sample_captions
    from ris_utils.captioning.tiny import init_uninitialised
    from ris_utils.models import register_open_clip_configs

    register_open_clip_configs()
    name = "coca_tiny" if smoke else "coca_ViT-L-14"
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    init_uninitialised(model)
    model = model.to(device).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    tok = open_clip.get_tokenizer(name)
    ids = TokenIds(sot=tok.sot_token_id, eot=tok.eot_token_id, pad=0, vocab_size=tok.vocab_size)
    settings = parse_settings([{"top_k": k} for k in (5, 7, 9, 11, 13)] +
                              [{"top_p": p} for p in (0.4, 0.5, 0.6, 0.7, 0.8)])
    dec = CocaDecoder(model)
    out: dict = {"fast": {}, "generate": {}}
    for prec, dtype in precisions:
        for n in masks_list:
            crops = torch.randn(n * views, 3, size, size, device=device)
            keys = np.array([[[row_key(0, "bench", i, v, s.name) for i in range(n)] for s in settings]
                             for v in range(views)], dtype=np.uint64)

            def fast():
                lat, embs = dec.encode_images(crops)
                lat = lat.view(n, views, -1).transpose(0, 1)
                embs = embs.view(n, views, *embs.shape[1:]).transpose(0, 1)
                return sample_captions(dec, ids, embs, lat, settings, keys, distinctive=True, seq_len=seq_len,
                                       min_seq_len=seq_len - 1)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad(), _autocast(device, dtype):
                sec = _timed(fast, device, repeats)
            n_caps = views * len(settings) * n
            out["fast"][(prec, n)] = {"s_per_image": sec, "captions_per_s": n_caps / sec, "peak_gb": _peak_gb(device)}
            print(f"CoCa {name} distinctive, KV cache, {prec}, N={n:2d}: {n_caps / sec:9.1f} captions/s "
                  f"({sec:.2f} s for {n_caps} captions), peak {_peak_gb(device):.1f} GB", flush=True)
        # the no-cache baseline: open_clip's generate, one caption per crop per call (plain top-k sampling)
        crops = torch.randn(baseline_masks, 3, size, size, device=device)

        def generate():
            return model.generate(crops, generation_type="top_k", top_k=5, seq_len=seq_len,
                                  min_seq_len=seq_len - 1)

        with torch.no_grad(), _autocast(device, dtype):
            sec = _timed(generate, device, max(1, repeats // 2))
        out["generate"][prec] = {"captions_per_s": baseline_masks / sec}
        print(f"CoCa {name} open_clip generate (no cache), {prec}: {baseline_masks / sec:9.1f} captions/s",
              flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", default="2,10,30", help="N masks of one image (the contrast term runs for 2..30)")
    ap.add_argument("--views", type=int, default=4, help="views per mask (paper: 4)")
    ap.add_argument("--seq-len", type=int, default=30, help="caption length incl. sot/eot (paper: 30)")
    ap.add_argument("--mean-masks", type=int, default=10, help="N̄ for the GPU-hours projection")
    ap.add_argument("--baseline-masks", type=int, default=10, help="crops per open_clip generate call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny configs on CPU (checks the script only)")
    args = ap.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        precisions = [("fp32", None), ("bf16", torch.bfloat16)]
        args.seq_len, args.repeats, args.views = min(args.seq_len, 8), 1, min(args.views, 2)
        masks_list = [2, 3]
        args.mean_masks, args.baseline_masks = 3, 2
    else:
        if not torch.cuda.is_available():
            print("no GPU: skipped (benchmarks/RESULTS.md says so; --smoke checks the script on CPU)")
            return 0
        device = torch.device("cuda")
        print("device:", torch.cuda.get_device_name(device), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
        precisions = [("fp32", None), ("bf16", torch.bfloat16)]
        masks_list = [int(m) for m in args.masks.split(",")]
        if args.mean_masks not in masks_list:
            masks_list.append(args.mean_masks)
    sam = bench_sam(device, precisions, args.repeats, args.smoke)
    coca = bench_coca(device, precisions, masks_list, args.views, args.seq_len, args.repeats, args.smoke,
                      args.baseline_masks)
    print("\n| precision | SAM encoder images/s | captions/s (KV cache, N=%d) | captions/s (generate, no cache) | "
          "cache / no cache | projected GPU-hours (16,994 images) |" % args.mean_masks)
    print("|---|---|---|---|---|---|")
    for prec, _ in precisions:
        fast = coca["fast"][(prec, args.mean_masks)]
        gen = coca["generate"][prec]["captions_per_s"]
        hours = N_IMAGES_REFCOCO_PLUS_TRAIN * (sam[prec]["s_per_image"] + fast["s_per_image"]) / 3600
        print(f"| {prec} | {sam[prec]['images_per_s']:.2f} | {fast['captions_per_s']:.1f} | {gen:.1f} | "
              f"{fast['captions_per_s'] / gen:.1f}x | {hours:.1f} |")
    if args.smoke:
        print("(smoke run: tiny models on CPU; these numbers say nothing about the paper scale)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
