"""RIS head on the CPU: a training step and an evaluation batch of the shapes model, variants side by side.

    python benchmarks/bench_ris_step.py [--rounds 10] [--batch 16]

Builds the shapes profile's RIS model (``papermill_runs/shapes.yaml``, section ``ris``: the pretrained shapes
CLIP, towers frozen, features precomputed as a run's cache holds them) in three variants that differ only in
the two speed switches of ``model_args``:

* ``neck_kernel: 3, channels_last: false`` -- CRIS's 3x3 neck convs;
* ``neck_kernel: 1, channels_last: false``;
* ``neck_kernel: 1, channels_last: true`` -- the profile's setting.

Each round times, for every variant in turn (interleaved, so a busy machine slows all of them alike), one
training step (forward, loss, backward, AdamW) on ``--batch`` sentences and one evaluation forward of 64
sentences over 8 images (the neck's image part once per image). Prints the median milliseconds and the ratio
to the first variant. One torch thread, as the grid's workers run.

A second table times the text-to-pixel contrast alone (forward + backward on the projector's map of a
training batch): CRIS's form, one convolution with ``groups=B``, against :func:`ris_utils.ris.model.dynamic_conv`
(the model's; channels contracted per tap by one batched matmul, the tap maps shifted and summed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _variants(cfg: dict, tok) -> dict:
    from ris_utils.ris.build import make_model

    out = {}
    for name, extra in (("3x3 neck", {"neck_kernel": 3, "channels_last": False}),
                        ("1x1 neck", {"neck_kernel": 1, "channels_last": False}),
                        ("1x1 neck + channels_last", {"neck_kernel": 1, "channels_last": True})):
        torch.manual_seed(0)
        out[name] = make_model({**cfg, "model_args": {**cfg["model_args"], **extra}}, tok)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from ris_utils.profiles import step_config
    from ris_utils.ris.build import build_tokenizer, resolve_config
    from ris_utils.ris.model import ris_loss

    cfg = resolve_config(step_config("shapes", "ris"))
    tok = build_tokenizer(cfg)
    size, b = int(cfg["input_size"]), int(args.batch)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(max(b, 8), 3, size, size, generator=g)
    tokens = tok(["the small red striped circle on the left"] * max(b, 64), context_length=cfg["word_len"])
    mask = (torch.rand(b, size, size, generator=g) > 0.9).float()
    runs = {}
    for name, model in _variants(cfg, tok).items():
        with torch.no_grad():
            feats, text = model.encode_image(img), model.encode_text(tokens)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        runs[name] = (model, feats, text, opt)

    def train_step(model, feats, text, opt):
        model.train()
        logits = model(None, tokens[:b], feats=tuple(f[:b] for f in feats), text=tuple(t[:b] for t in text))
        loss = ris_loss(logits, mask, dice_weight=cfg["dice_weight"], target=cfg["loss_target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def eval_batch(model, feats, text, opt):
        model.eval()
        index = torch.arange(64) % 8
        model(None, tokens[:64], feats=tuple(f[:8] for f in feats), text=tuple(t[:64] for t in text),
              image_index=index)

    times = {name: ([], []) for name in runs}
    for r in range(args.rounds + 1):
        for name, run in runs.items():
            for k, fn in enumerate((train_step, eval_batch)):
                t0 = time.perf_counter()
                fn(*run)
                if r:  # round 0 warms up
                    times[name][k].append(time.perf_counter() - t0)
    base = {k: statistics.median(times[next(iter(times))][k]) for k in (0, 1)}
    print(f"{'variant':28s} {'train step ms':>14s} {'ratio':>6s} {'eval 64 ms':>11s} {'ratio':>6s}")
    for name, (tr, ev) in times.items():
        mt, me = statistics.median(tr), statistics.median(ev)
        print(f"{name:28s} {1000 * mt:14.1f} {mt / base[0]:6.2f} {1000 * me:11.1f} {me / base[1]:6.2f}")
    _contrast_table(cfg, b, args.rounds)
    return 0


def _contrast_table(cfg: dict, b: int, rounds: int) -> None:
    """Forward + backward of the text-to-pixel contrast on the projector's (B, C, S/8, S/8) map."""
    import torch.nn.functional as F

    from ris_utils.ris.model import dynamic_conv

    c, hw, k = int(cfg["model_args"]["fpn_out"][1]) // 2, int(cfg["input_size"]) // 8, 3
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, c, hw, hw, generator=g).contiguous(memory_format=torch.channels_last)
    p0 = torch.randn(b, c * k * k + 1, generator=g)

    def grouped(x, p):
        w = p[:, :-1].reshape(b, c, k, k)
        return F.conv2d(x.reshape(1, b * c, hw, hw), w, p[:, -1], padding=k // 2, groups=b).transpose(0, 1)

    fns = {"grouped conv (CRIS form)": grouped, "dynamic_conv (per-tap matmul)": lambda x, p: dynamic_conv(
        x, p[:, :-1], p[:, -1], k)}
    times = {name: [] for name in fns}
    for r in range(rounds * 5 + 1):
        for name, fn in fns.items():
            x, p = x0.clone().requires_grad_(), p0.clone().requires_grad_()
            t0 = time.perf_counter()
            fn(x, p).square().sum().backward()
            if r:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[next(iter(times))])
    print(f"\n{'contrast (fwd + bwd)':32s} {'ms':>8s} {'ratio':>6s}")
    for name, t in times.items():
        print(f"{name:32s} {1000 * statistics.median(t):8.2f} {statistics.median(t) / base:6.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
