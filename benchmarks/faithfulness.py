"""Faithfulness metrics against the least work they need, and ROAD against pytorch-grad-cam's (issue 12).

    python benchmarks/faithfulness.py            # resnet18 224px: deletion + insertion of 64 images, ROAD of 4 images
    python benchmarks/faithfulness.py --quick    # 16 images and 2 images, 112px

1. deletion + insertion, 20 steps each: `faithfulness(..., metrics=['deletion', 'insertion'])` against the
   2 x steps x n plain `no_grad` forward passes that the two curves need (batches of `--bs`, inputs built beforehand).
2. ROAD (MoRF and LeRF, percentiles 10..90, probability of the class) against pytorch-grad-cam's
   `ROADMostRelevantFirstAverage` + `ROADLeastRelevantFirstAverage` on the same maps, both with their default noise
   (0.01); then, with the noise off, the per-image scores of both (pytorch-grad-cam's `percentile=q` is ours at
   `100 - q`, its score is the change of the probability): the imputed images, and the scores of the same images
   run in the same batches as it runs them, and end to end. The maps are CAM's, upsampled, with uniform noise of
   1e-4 to break ties (bilinear upsampling repeats values along the border), then replaced by their ranks k/(HW-1):
   where values tie (also after its `1 - map` in float32) its threshold and our ranking pick different pixels;
   without ties they pick the same ones."""
from __future__ import annotations
import argparse, math, time
import numpy as np
import torch
from _common import *
from fastai_cam.faithfulness import faithfulness, linear_impute, pixel_ranks, ROAD_PERCENTILES

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='8 images (deletion + insertion) and 1 (ROAD)')
    p.add_argument('--arch', default='resnet18')
    p.add_argument('--size', type=int, default=None, help='image side (default 224)')
    p.add_argument('--n', type=int, default=None, help='images for deletion + insertion (default 64, quick 8)')
    p.add_argument('--n-road', type=int, default=None, help='images for ROAD (default 4, quick 1)')
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--part', choices=['all', 'curves', 'road'], default='all', help='run one part only')
    add_common_args(p)
    a = p.parse_args(argv)
    setup(a)
    size, n, nr = a.size or 224, a.n or (8 if a.quick else 64), a.n_road or (1 if a.quick else 4)
    t0 = time.time()
    model = resnet(a.arch)
    torch.manual_seed(0)
    x = torch.randn(n, 3, size, size)
    with torch.no_grad(): cls = model(x).argmax(1)
    rows = []

    if a.part in ('all', 'curves'): rows.append(curves_row(a, model, x, cls, n))
    agree = road_rows(a, model, x, cls, nr, rows) if a.part in ('all', 'road') else None
    print(f"## faithfulness: {a.arch} {size}x{size}, CPU\n")
    print(f"{machine()}; {a.rounds} rounds; total {time.time()-t0:.0f} s\n")
    print(table(['measurement', 'ours', 'baseline', 'ratio', 'goal'], rows))
    if agree is not None:
        di, ds, de, lmax = agree
        print(f"\nROAD agreement with pytorch-grad-cam (noise off, 2 orders x 9 percentiles x {nr} images), max abs diff:\n"
              f"- imputed images: {di:.1e}\n- change of the class probability, the images in the same batches as it: "
              f"{ds:.1e} ({'<= 1e-5: met' if ds <= 1e-5 else 'MISSED'})\n- the same, ours in our batches of {a.bs} rows "
              f"(other batch sizes, other float rounding; logits up to {lmax:.0f} in this random model): {de:.1e}")

def curves_row(a, model, x, cls, n):
    "Deletion + insertion (of Grad-CAM's maps) against the plain forwards they need"
    maps = ours(model, x, 'gradcam', 'layer4', cls)
    def plain():
        with torch.no_grad():
            for _ in range(2*a.steps):
                for s in range(0, n, a.bs): model(x[s:s+a.bs])
    def di(): faithfulness(model, x, maps, cls, ['deletion', 'insertion'], steps=a.steps, bs=a.bs)
    t = interleaved({'ours': di, 'plain': plain}, rounds=a.rounds, warmup=0)
    r = ratio(t, 'ours', 'plain')
    return [f"deletion + insertion, {a.steps} steps, {n} images / the 2x{a.steps}x{n} plain forwards",
            fmt_s(med(t['ours'])), fmt_s(med(t['plain'])), fmt_r(r), goal_str(r, 1.10)]

def road_rows(a, model, x, cls, nr, rows):
    "ROAD against pytorch-grad-cam's: a timing row, and the max abs difference of the scores with the noise off"
    try:
        from pytorch_grad_cam.metrics.road import (ROADMostRelevantFirstAverage, ROADLeastRelevantFirstAverage,
                                                   NoisyLinearImputer)
        from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric,
                                                                      RemoveMostRelevantFirst, RemoveLeastRelevantFirst)
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    except ImportError:
        print("(pytorch-grad-cam is not installed: no ROAD rows)"); return None
    xr, cr = x[:nr], cls[:nr]
    torch.manual_seed(1)
    m = ours(model, xr, 'cam', 'layer4', cr) + 1e-4 * torch.rand(nr, *x.shape[-2:])
    mr = (pixel_ranks(-m).float() / (m[0].numel() - 1)).view_as(m)     # the same order, values k/(HW-1): no ties
    cams, tg = mr.numpy(), [ClassifierOutputSoftmaxTarget(int(c)) for c in cr]
    qs = [100 - p for p in ROAD_PERCENTILES]
    def peer():
        ROADMostRelevantFirstAverage(qs)(xr, cams, tg, model); ROADLeastRelevantFirstAverage(qs)(xr, cams, tg, model)
    def mine(): faithfulness(model, xr, mr, cr, ['road_morf', 'road_lerf'], bs=a.bs)
    t = interleaved({'ours': mine, 'peer': peer}, rounds=a.rounds, warmup=0)
    r = ratio(t, 'ours', 'peer')
    rows.append([f"ROAD MoRF + LeRF, 9 percentiles, {nr} images / pytorch-grad-cam's", fmt_s(med(t['ours'])),
                 fmt_s(med(t['peer'])), fmt_r(r), goal_str(r, 0.5)])
    res = faithfulness(model, xr, mr, cr, ['road_morf', 'road_lerf'], noise=0., bs=a.bs)
    P = mr[0].numel()
    rank = pixel_ranks(mr)
    with torch.no_grad():
        out0 = model(xr)
        y0 = out0.softmax(-1)[torch.arange(nr), cr]
    d_img, d_same, d_e2e = [], [], []
    for kind, Rm in (('road_morf', RemoveMostRelevantFirst), ('road_lerf', RemoveLeastRelevantFirst)):
        for j, pct in enumerate(ROAD_PERCENTILES):
            theirs, imgs = PerturbationConfidenceMetric(Rm(100 - pct, NoisyLinearImputer(noise=0)))(
                xr, cams, tg, model, return_visualization=True)
            k = P - math.ceil((P - 1) * (100 - pct) / 100 - 1e-9)     # as `faithfulness` counts them
            rm = (rank < k if kind == 'road_morf' else rank >= P - k).view(mr.shape)
            mine_imgs = linear_impute(xr, rm)                      # what `faithfulness` feeds the model
            with torch.no_grad(): same = model(mine_imgs).softmax(-1)[torch.arange(nr), cr] - y0   # in its batches
            theirs = np.asarray(theirs).reshape(-1)
            d_img.append((mine_imgs - imgs).abs().max().item())
            d_same.append(np.abs(same.numpy() - theirs).max())
            d_e2e.append(np.abs((res[kind].scores[:, j] - y0).numpy() - theirs).max())
    return max(d_img), max(d_same), max(d_e2e), out0.abs().max().item()

if __name__ == '__main__': main()
