"""Faithfulness metrics against the least work they need, and ROAD against pytorch-grad-cam's (issue 12).

    python benchmarks/faithfulness.py            # resnet18 224px: deletion + insertion of 64 images, ROAD of 4 images
    python benchmarks/faithfulness.py --quick    # 16 images and 2 images, 112px

1. deletion + insertion, 20 steps each: `faithfulness(..., metrics=['deletion', 'insertion'])` against the
   2 x steps x n plain `no_grad` forward passes that the two curves need (batches of `--bs`, inputs built beforehand).
2. ROAD (MoRF and LeRF, percentiles 10..90, probability of the class) against pytorch-grad-cam's
   `ROADMostRelevantFirstAverage` + `ROADLeastRelevantFirstAverage` on the same maps, both with their default noise
   (0.01); then, with the noise off, the per-image scores of both (pytorch-grad-cam's `percentile=q` is ours at
   `100 - q`, its score is the change of the probability). The maps are CAM's, upsampled and min-max normalised:
   no ties, so that its threshold and our ranking pick the same pixels, as they do at 224x224 (for other sizes the
   counts can differ by a pixel: it removes the pixels above the q-th percentile, we remove round(p% of H*W))."""
from __future__ import annotations
import argparse, time
import numpy as np
import torch
from _common import *
from fastai_cam.faithfulness import faithfulness, ROAD_PERCENTILES

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
    add_common_args(p)
    a = p.parse_args(argv)
    setup(a)
    size, n, nr = a.size or 224, a.n or (8 if a.quick else 64), a.n_road or (1 if a.quick else 4)
    t0 = time.time()
    model = resnet(a.arch)
    torch.manual_seed(0)
    x = torch.randn(n, 3, size, size)
    with torch.no_grad(): cls = model(x).argmax(1)
    maps = ours(model, x, 'gradcam', 'layer4', cls)
    rows = []

    # 1. deletion + insertion vs the plain forwards they need
    def plain():
        with torch.no_grad():
            for _ in range(2*a.steps):
                for s in range(0, n, a.bs): model(x[s:s+a.bs])
    def di(): faithfulness(model, x, maps, cls, ['deletion', 'insertion'], steps=a.steps, bs=a.bs)
    t = interleaved({'ours': di, 'plain': plain}, rounds=a.rounds, warmup=0)
    r = ratio(t, 'ours', 'plain')
    rows.append([f"deletion + insertion, {a.steps} steps, {n} images / the 2x{a.steps}x{n} plain forwards",
                 fmt_s(med(t['ours'])), fmt_s(med(t['plain'])), fmt_r(r), goal_str(r, 1.10)])

    # 2. ROAD vs pytorch-grad-cam
    agree = None
    try:
        from pytorch_grad_cam.metrics.road import (ROADMostRelevantFirstAverage, ROADLeastRelevantFirstAverage,
                                                   NoisyLinearImputer)
        from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric,
                                                                      RemoveMostRelevantFirst, RemoveLeastRelevantFirst)
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    except ImportError: print("(pytorch-grad-cam is not installed: no ROAD rows)")
    else:
        xr, cr = x[:nr], cls[:nr]
        mr = ours(model, xr, 'cam', 'layer4', cr)
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
        with torch.no_grad(): y0 = model(xr).softmax(-1)[torch.arange(nr), cr]
        diffs = []
        for kind, Rm in (('road_morf', RemoveMostRelevantFirst), ('road_lerf', RemoveLeastRelevantFirst)):
            for j, pct in enumerate(ROAD_PERCENTILES):
                theirs = PerturbationConfidenceMetric(Rm(100 - pct, NoisyLinearImputer(noise=0)))(xr, cams, tg, model)
                diffs.append(np.abs((res[kind].scores[:, j] - y0).numpy() - np.asarray(theirs).reshape(-1)).max())
        agree = max(diffs)
    print(f"## faithfulness: {a.arch} {size}x{size}, CPU\n")
    print(f"{machine()}; {a.rounds} rounds; total {time.time()-t0:.0f} s\n")
    print(table(['measurement', 'ours', 'baseline', 'ratio', 'goal'], rows))
    if agree is not None:
        print(f"\nROAD agreement with pytorch-grad-cam (noise off, 2 orders x 9 percentiles x {nr} images, change of "
              f"the class probability): max abs diff {agree:.1e} ({'<= 1e-5: met' if agree <= 1e-5 else 'MISSED'})")

if __name__ == '__main__': main()
