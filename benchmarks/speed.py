"""Speed of `cam_maps` against the bare minimum each method needs (issues 2 and 3): a plain `no_grad` forward, or a
hand-written hook + `torch.autograd.grad`. Prints one markdown table of ratios (ours / baseline), measured
interleaved in one run: the median over rounds of the per-round ratio.

    python benchmarks/speed.py            # resnet50, 224x224, batch 16, CPU, 7 rounds (Score-CAM: resnet18 224px)
    python benchmarks/speed.py --quick    # resnet18 at 112px, batch 8, 3 rounds (well under a minute)
    python benchmarks/speed.py --only-seg # Seg-Grad-CAM on a resnet34 DynamicUnet, 224px, batch 8 (issue 11)
"""
from __future__ import annotations
import argparse, sys, time
import torch
from _common import *

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='fewer rounds and a smaller Score-CAM case (about a minute)')
    p.add_argument('--arch', default='resnet50')
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--bs', type=int, default=16)
    p.add_argument('--rounds', type=int, default=None, help='interleaved rounds (default 7, quick 3)')
    p.add_argument('--no-learner', action='store_true', help='skip the learn.cam end-to-end rows')
    p.add_argument('--scorecam-arch', default='resnet18',
                   help='model of the Score-CAM row (resnet50 at 224px: 2048 masked forwards, minutes per call)')
    p.add_argument('--seg-arch', default='resnet34', help="encoder of the Seg-Grad-CAM row's fastai U-Net")
    p.add_argument('--seg-size', type=int, default=224)
    p.add_argument('--seg-bs', type=int, default=8)
    p.add_argument('--no-seg', action='store_true', help='skip the Seg-Grad-CAM row')
    p.add_argument('--only-seg', action='store_true', help='only the Seg-Grad-CAM row')
    add_common_args(p)
    a = p.parse_args(argv)
    setup(a)
    rounds = a.rounds or (3 if a.quick else 7)
    if a.quick: a.seg_arch, a.seg_size, a.seg_bs = 'resnet18', 64, 4
    if a.only_seg:
        rows, t0 = [], time.time()
        seg_rows(a, rounds, rows)
        print(f"## speed: Seg-Grad-CAM vs the minimum work ({a.seg_arch} U-Net, {a.seg_size}x{a.seg_size}, batch {a.seg_bs}, CPU)\n")
        print(machine() + f"; {rounds} rounds; total {time.time()-t0:.0f} s\n")
        print(table(['measurement', 'ours', 'baseline', 'ratio', 'goal'], rows))
        return
    if a.quick: a.arch, a.size, a.bs = 'resnet18', 112, 8
    torch.manual_seed(0)
    model = resnet(a.arch)
    x = torch.randn(a.bs, 3, a.size, a.size)
    with torch.no_grad(): cls = model(x).argmax(1)
    B = len(x)

    def fwd():
        with torch.no_grad(): return model(x)

    def handwritten(layer):
        "Forward hook on `layer`, `torch.autograd.grad` of the selected logits to its output: nothing else"
        mod, store = get_module(model, layer), {}
        def run():
            h = mod.register_forward_hook(lambda m, i, o: store.__setitem__('a', o))
            try:
                logits = model(x)
                g, = torch.autograd.grad(logits[torch.arange(B), cls].sum(), store['a'])
            finally: h.remove()
            return g
        return run

    rows = []
    def add(label, times, a_, b_, goal=None):
        r = ratio(times, a_, b_)
        rows.append([label, fmt_s(med(times[a_])), fmt_s(med(times[b_])), fmt_r(r), goal_str(r, goal)])

    t0 = time.time()
    fns = {'fwd': fwd,
           'cam': lambda: cam_maps(model, x, 'cam'),
           'gradcam': lambda: cam_maps(model, x, 'gradcam'),
           'eigencam': lambda: cam_maps(model, x, 'eigencam')}
    t = interleaved(fns, rounds)
    add("`cam_maps(method='cam')` / no_grad forward", t, 'cam', 'fwd', 1.05)
    add("`cam_maps(method='gradcam')` (default layer) / no_grad forward", t, 'gradcam', 'fwd', 1.10)
    add("`cam_maps(method='eigencam')` / no_grad forward", t, 'eigencam', 'fwd', 1.3)

    fns = {'hand': handwritten('layer2'), 'gradcam_l2': lambda: cam_maps(model, x, 'gradcam', layer='layer2'),
           'fwd': fwd}
    t = interleaved(fns, rounds)
    add("`cam_maps(method='gradcam', layer='layer2')` / hook + `autograd.grad` by hand", t, 'gradcam_l2', 'hand', 1.05)
    add("hook + `autograd.grad` by hand at layer2 / no_grad forward (for scale)", t, 'hand', 'fwd')

    # end to end: maps at input size in [0,1]
    fns = {'raw': lambda: cam_maps(model, x, 'gradcam'), 'e2e': lambda: ours(model, x, 'gradcam', None, cls)}
    if not a.no_learner:
        learn = learner_for(model, x)
        if learn is not None:
            fns['cam_batch'] = lambda: learn.cam_batch(x, method='gradcam')
            fns['cam_dl'] = lambda: learn.cam(dl=learn.dls.valid, method='gradcam')
    t = interleaved(fns, rounds)
    add("`cam_maps` + `upsample` + `minmax` / `cam_maps` (Grad-CAM)", t, 'e2e', 'raw')
    if 'cam_batch' in t:
        add("`learn.cam_batch(xb, method='gradcam')` / `cam_maps` (Grad-CAM)", t, 'cam_batch', 'raw')
        add("`learn.cam(dl=dl, method='gradcam')` (one batch, its own validation loop) / `cam_maps`", t, 'cam_dl', 'raw')

    # Score-CAM, batch 1: K masked forwards are unavoidable
    sarch, ssize = ('resnet18', 112) if a.quick else (a.scorecam_arch, a.size)
    smodel = model if sarch == a.arch else resnet(sarch)
    x1 = torch.randn(1, 3, ssize, ssize)
    K = smodel.fc.in_features                   # channels of layer4 in a torchvision resnet
    xk = torch.randn(32, 3, ssize, ssize)
    def fwd1():
        with torch.no_grad(): smodel(x1)
    def fwdK():
        "the K masked forwards alone, in batches of 32 (the lower bound of any Score-CAM)"
        with torch.no_grad():
            for s in range(0, K, 32): smodel(xk[:min(32, K - s)])
    fns = {'fwd1': fwd1, 'scorecam': lambda: cam_maps(smodel, x1, 'scorecam'), 'fwdK': fwdK}
    fwd1()
    t = interleaved(fns, 1, warmup=0)
    add(f"Score-CAM batch 1 ({sarch} {ssize}px, layer4, K={K}) / one no_grad forward", t, 'scorecam', 'fwd1')
    add(f"Score-CAM batch 1 / K={K} masked no_grad forwards in batches of 32 (default layout, as the peers run them)", t, 'scorecam', 'fwdK')

    if not a.no_seg: seg_rows(a, rounds, rows)

    print(f"## speed: `cam_maps` vs the minimum work ({a.arch}, {a.size}x{a.size}, batch {a.bs}, CPU)\n")
    print(machine() + f"; {rounds} rounds; total {time.time()-t0:.0f} s\n")
    print(table(['measurement', 'ours', 'baseline', 'ratio', 'goal'], rows))

def seg_rows(a, rounds, rows):
    "Seg-Grad-CAM (issue 11): `cam_maps` with a `RegionTarget` vs a hand-written hook + `autograd.grad` of the same region score"
    from fastai_cam.targets import RegionTarget
    from fastai_cam.core import find_layer
    arch, size, bs = a.seg_arch, a.seg_size, a.seg_bs
    model, x = unet(arch, size, bs)
    with torch.no_grad(): c = int(model(x).argmax(1).flatten().mode().values)     # a class predicted somewhere
    name, mod = find_layer(model)                                                 # the last decoder block
    def hand():
        "Forward hook on the layer, the sum of class c's logits over its predicted pixels, `torch.autograd.grad`"
        store = {}
        h = mod.register_forward_hook(lambda m, i, o: store.__setitem__('a', o))
        try:
            out = model(x)
            g, = torch.autograd.grad((out[:, c] * (out.argmax(1) == c)).sum(), store['a'])
        finally: h.remove()
        return g
    def fwd():
        with torch.no_grad(): return model(x)
    fns = {'hand': hand, 'ours': lambda: cam_maps(model, x, 'gradcam', target=RegionTarget(c)), 'fwd': fwd}
    t = interleaved(fns, rounds)
    r = ratio(t, 'ours', 'hand')
    rows.append([f"Seg-Grad-CAM: `cam_maps(method='gradcam', target=RegionTarget(c))` at {name!r} ({arch} U-Net, "
                 f"{size}px, batch {bs}) / hook + `autograd.grad` of the same region score by hand",
                 fmt_s(med(t['ours'])), fmt_s(med(t['hand'])), fmt_r(r), goal_str(r, 1.10)])
    r = ratio(t, 'ours', 'fwd')
    rows.append([f"Seg-Grad-CAM / no_grad forward (for scale)", fmt_s(med(t['ours'])), fmt_s(med(t['fwd'])), fmt_r(r), ''])

if __name__ == '__main__': main()
