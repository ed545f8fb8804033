"""fastai_cam against its peers (pytorch-grad-cam, torchcam, captum), issue 5: agreement of the maps and speed.

Agreement: random-init torchvision resnet18 and resnet50, the same layer and class (the predicted one), every map
upsampled with the same bilinear interpolation (`align_corners=False`) to the input size and min-max normalised;
max abs diff and correlation, with why they differ (read from the peers' source, and checked here where it can be).

Speed: ours end to end (`cam_maps` + `upsample` + `minmax`) against each peer's call returning maps at input size
in [0, 1], interleaved; a ratio < 1 means ours is faster.

    python benchmarks/peers.py                  # agreement + speed (resnet50 224px, batch 1 and 16)
    python benchmarks/peers.py --part agree     # only the agreement table
    python benchmarks/peers.py --quick          # resnet18 at 112px, batch 1 and 8, 2 rounds (about a minute)
    python benchmarks/peers.py --part seg       # Seg-Grad-CAM on a resnet34 U-Net: agreement and speed (issue 11)
"""
from __future__ import annotations
import argparse, contextlib, functools, io, time
import torch
from _common import *
import fastai_cam.methods as fm

def corr(a, b):
    a,b = a.flatten().double(), b.flatten().double()
    if a.std() == 0 or b.std() == 0: return float('nan')
    return torch.corrcoef(torch.stack([a, b]))[0,1].item()

def maxdiff(a, b): return (a.float() - b.float()).abs().max().item()

def _with_method(name, fn):
    "Context manager: our method table with `name` computed by `fn(A, G)` (to show what a peer computes)"
    import contextlib
    @contextlib.contextmanager
    def cm():
        old = fm.METHODS[name]
        fm.METHODS[name] = fm.Method(name, fn, old.needs_grad, old.doc)
        try: yield
        finally: fm.METHODS[name] = old
    return cm()

@functools.cache
def _pgc_upsample_align_false():
    "pytorch-grad-cam's Score-CAM with `F.interpolate(..., align_corners=False)` instead of `UpsamplingBilinear2d`"
    import contextlib, pytorch_grad_cam.score_cam as sc
    class Up(torch.nn.Module):
        def __init__(self, size): super().__init__(); self.size = size
        def forward(self, x): return torch.nn.functional.interpolate(x, self.size, mode='bilinear', align_corners=False)
    @contextlib.contextmanager
    def cm():
        old = sc.torch.nn.UpsamplingBilinear2d
        sc.torch.nn.UpsamplingBilinear2d = Up
        try: yield
        finally: sc.torch.nn.UpsamplingBilinear2d = old
    return cm

def why(model, x, method, layer, cls, peer, ours_map, peer_map, d):
    "A short explanation of a difference, checked by recomputing where possible"
    if method == 'gradcam++' and peer == 'pytorch-grad-cam':
        with _with_method('gradcam++', functools.partial(fm.gradcam_pp, eps=1e-6)):
            d2 = maxdiff(ours(model, x, method, layer, cls), peer_map)
        return f"eps 1e-6 in alpha's denominator (ours 1e-7), larger than G^2 here; ours with eps=1e-6: {d2:.1e}"
    if method == 'gradcam++' and peer == 'torchcam':
        f = lambda A, G: fm.weighted_sum(A.float(), (G.float().relu()**3).sum((2,3)))
        with _with_method('gradcam++', f): d2 = maxdiff(ours(model, x, method, layer, cls), peer_map)
        return ("`alpha[idx][mask].div_(...)` divides a copy (boolean indexing), so alpha = G^2 and w = sum relu(G)^3; "
                f"ours with that w: {d2:.1e}")
    if method == 'scorecam' and peer == 'pytorch-grad-cam':
        with _pgc_upsample_align_false()(): d2 = maxdiff(ours_map, pgc(model, x, method, layer, cls))
        return f"masks upsampled by `nn.UpsamplingBilinear2d` (align_corners=True); with align_corners=False: {d2:.1e}"
    if method == 'scorecam' and peer == 'torchcam':
        return ("min-max per channel at the layer's resolution, then upsample (ours: upsample, then min-max), so the "
                "masks differ by an affine map per channel" + ('; identical at this size' if d <= 1e-4 else ''))
    if '.bn' in layer and peer != 'captum':
        block = layer.rsplit('.', 1)[0]
        if method == 'eigencam':
            same, flip = _eigen_signs(model, x, block, ours(model, x, method, block, cls), peer_map)
            return (f"peer keeps the output without a clone: the block's `out += identity` and in-place ReLU overwrite "
                    f"it, so it gets the block output {block!r}, and no sign fix: peer vs ours at {block!r}: "
                    f"{min(same, flip):.1e} with the {'same' if same <= flip else 'opposite'} sign")
        if peer == 'torchcam':
            d2 = maxdiff(ours(model, x, method, block, cls), peer_map)
            return (f"keeps the output without a clone and takes the gradient of that tensor object after the block's "
                    f"`out += identity` and in-place ReLU changed it: it is Grad-CAM of {block!r} (ours there: {d2:.1e})")
        d2 = maxdiff(_gradcam_mixed(model, x, layer, block, cls), peer_map)
        return (f"activations read after the in-place `out += identity`, ReLU (the block output {block!r}) but gradient "
                f"hooked before them (dS/d{layer.rsplit('.',1)[1]} = dS/dblock * [block>0]); that mix computed by "
                f"hand: {d2:.1e}")
    if '.bn' in layer: return "captum clones the layer output in its hook, as ours does"
    if method == 'eigencam' and peer == 'pytorch-grad-cam':
        same, flip = _eigen_signs(model, x, layer, ours_map, peer_map)
        return (f"no sign fix: SVD's sign is arbitrary (ours: the sign correlating with the mean map); here the "
                f"{'same' if same <= flip else 'opposite'} sign (ours vs its map of -projection: {flip:.1e})")
    if d <= 1e-4:
        return {('cam','torchcam'): 'same (W.a, no ReLU)', ('xgradcam','torchcam'): 'same (eps 1e-8 vs 1e-7)'}.get(
            (method, peer), 'same formula')
    return ''

def _eigen_signs(model, x, layer, ours_map, peer_map):
    "(diff to the peer's map, diff to the peer's map with the projection's sign flipped)"
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
    from fastai_cam.core import compute_cams
    A = compute_cams(model, x, 'eigencam', layer, keep_acts=True).acts
    proj = torch.from_numpy(get_2d_projection(A.numpy()))
    return maxdiff(ours_map, peer_map), maxdiff(ours_map, minmax(upsample((-proj).relu(), x.shape[-2:])))

def _gradcam_mixed(model, x, layer, block, cls):
    "Grad-CAM from the block's output A and the gradient at `layer` (= dS/dA * [A > 0]): what pytorch-grad-cam gets"
    store = {}
    h = get_module(model, block).register_forward_hook(lambda m, i, o: store.__setitem__('a', o))
    try:
        out = model(x)
        A = store['a']
        G, = torch.autograd.grad(out[torch.arange(len(x)), cls].sum(), A)
    finally: h.remove()
    A = A.detach()
    G = G * (A > 0)
    return minmax(upsample(fm.weighted_sum(A, G.mean((2, 3))), x.shape[-2:]))

def agreement(quick:bool):
    rows = []
    cases = [('resnet18', 64 if quick else 112, ['layer4', 'layer2', 'layer4.1.bn2'])]
    if not quick: cases.append(('resnet50', 224, ['layer4', 'layer2', 'layer4.2.bn3']))
    for arch, size, layers in cases:
        model = resnet(arch)
        torch.manual_seed(1)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad(): cls = model(x).argmax(1).tolist()
        for layer in layers:
            for method in METHODS:
                if method == 'cam' and layer != 'layer4': continue
                if '.bn' in layer and method not in ('gradcam', 'eigencam'): continue
                if method == 'scorecam' and (arch == 'resnet50' or '.bn' in layer): continue   # K forwards: too slow
                if method == 'scorecam': xs = x[:, :, :64, :64] if not quick else x
                else: xs = x
                a = ours(model, xs, method, layer, cls)
                for peer in peers_of(method):
                    b = run_impl(peer, model, xs, method, layer, cls)
                    d = maxdiff(a, b)
                    w = why(model, xs, method, layer, cls, peer, a, b, d)
                    const = ' (constant maps)' if a.std() == 0 else ''
                    rows.append([f"{arch} {xs.shape[-1]}px", layer, method, peer, f"{d:.1e}{const}",
                                 f"{corr(a, b):.4f}", w])
    rows += seg_agreement(quick)
    print("## agreement with the peers (maps at input size, min-max normalised; batch of 2, predicted class)\n")
    print(table(['model', 'layer', 'method', 'peer', 'max abs diff', 'corr', 'why'], rows))
    print()

def _seg_case(arch, size, bs):
    "A random-init fastai U-Net, a batch, a class it predicts somewhere, and the pixels predicted as that class"
    model, x = unet(arch, size, bs)
    with torch.no_grad(): pred = model(x).argmax(1)
    c = int(pred.flatten().mode().values)
    return model, x, c, pred == c

def seg_ours(model, x, c):
    "Seg-Grad-CAM end to end: a `RegionTarget` over the predicted pixels of class c, at the automatic layer"
    from fastai_cam.targets import RegionTarget
    return minmax(upsample(cam_maps(model, x, 'gradcam', target=RegionTarget(c)), x.shape[-2:]))

def seg_pgc(model, x, c, masks, layer):
    "pytorch-grad-cam's `SemanticSegmentationTarget` with the same masks, at the same layer"
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
    targets = [SemanticSegmentationTarget(c, m.float().numpy()) for m in masks]
    with pytorch_grad_cam.GradCAM(model=model, target_layers=[layer]) as cam, contextlib.redirect_stderr(io.StringIO()):
        return torch.from_numpy(cam(input_tensor=x, targets=targets))

def seg_agreement(quick:bool)->list:
    "Seg-Grad-CAM (issue 11) against pytorch-grad-cam's `SemanticSegmentationTarget`, on a fastai U-Net"
    if 'pytorch-grad-cam' not in peers_of('gradcam'): return []
    from fastai_cam.core import find_layer
    arch, size = ('resnet18', 64) if quick else ('resnet34', 224)
    model, x, c, masks = _seg_case(arch, size, 2)
    name, mod = find_layer(model)
    a, b = seg_ours(model, x, c), seg_pgc(model, x, c, masks, mod)
    d = maxdiff(a, b)
    return [[f"{arch} U-Net {size}px", name, 'gradcam (Seg-Grad-CAM)', 'pytorch-grad-cam', f"{d:.1e}", f"{corr(a, b):.4f}",
             "same score: the sum of the class's logits over its predicted pixels (`RegionTarget` / `SemanticSegmentationTarget`)"]]

def seg_speed(quick:bool, rounds:int)->list:
    "Seg-Grad-CAM end to end, ours vs pytorch-grad-cam's, on a fastai U-Net (batch 8 at 224px)"
    if 'pytorch-grad-cam' not in peers_of('gradcam'): return []
    from fastai_cam.core import find_layer
    arch, size, bs = ('resnet18', 64, 4) if quick else ('resnet34', 224, 8)
    model, x, c, masks = _seg_case(arch, size, bs)
    name, mod = find_layer(model)
    def fwd():
        with torch.no_grad(): model(x)
    t = interleaved({'ours': lambda: seg_ours(model, x, c), 'pytorch-grad-cam': lambda: seg_pgc(model, x, c, masks, mod),
                     'fwd': fwd}, rounds)
    return [[f"Seg-Grad-CAM ({arch} U-Net {size}px)", name, bs, fmt_s(med(t['ours'])),
             fmt_r(ratio(t, 'ours', 'pytorch-grad-cam')), '', '',
             f"ours {fmt_r(ratio(t, 'ours', 'fwd'))}, pytorch-grad-cam {fmt_r(ratio(t, 'pytorch-grad-cam', 'fwd'))} a forward", '']]

def seg_tables(quick:bool, rounds:int):
    "Only the Seg-Grad-CAM rows of the agreement and speed tables"
    t0 = time.time()
    print("## Seg-Grad-CAM against pytorch-grad-cam's `SemanticSegmentationTarget` (maps at input size, min-max normalised)\n")
    print(table(['model', 'layer', 'method', 'peer', 'max abs diff', 'corr', 'why'], seg_agreement(quick)))
    rows = seg_speed(quick, rounds)
    print(f"\n{machine()}; {rounds} rounds\n")
    print(table(['method', 'layer', 'batch', 'ours', 'vs pytorch-grad-cam', 'vs torchcam', 'vs captum', 'note', 'goal'], rows))
    print(f"\ntotal {time.time()-t0:.0f} s")

GOALS = {'cam': 'ours raw <= 1.05x forward', 'scorecam': '<= 0.8x fastest peer', 'eigencam': '<= 0.3x pytorch-grad-cam'}
for _m in GRAD_METHODS: GOALS[_m] = '<= 1.0x fastest peer, <= 0.45x pytorch-grad-cam'

def goal_check(method, t, peers):
    "Whether this row meets issue 5's goal"
    r = {p: ratio(t, 'ours', p) for p in peers}
    if method == 'cam': ok = ratio(t, 'raw', 'fwd') <= 1.05
    elif method == 'eigencam': ok = r.get('pytorch-grad-cam', 0) <= 0.3
    elif method == 'scorecam': ok = max(r.values()) <= 0.8
    else: ok = max(r.values()) <= 1.0 and r.get('pytorch-grad-cam', 0) <= 0.45
    return 'met' if ok else 'MISSED'

def speed(quick:bool, rounds:int|None):
    arch, size, batches = ('resnet18', 112, [1, 8]) if quick else ('resnet50', 224, [1, 16])
    rounds = rounds or (2 if quick else 3)
    model = resnet(arch)
    all_peers = ['pytorch-grad-cam', 'torchcam', 'captum']
    rows = []
    t0 = time.time()
    for bs in batches:
        torch.manual_seed(0)
        x = torch.randn(bs, 3, size, size)
        with torch.no_grad(): cls = model(x).argmax(1).tolist()
        learn = learner_for(model, x)
        for layer in ['layer4', 'layer2']:
            for method in METHODS:
                if method == 'cam' and layer != 'layer4': continue
                if method == 'scorecam': continue
                peers = peers_of(method)
                def fwd():
                    with torch.no_grad(): model(x)
                fns = {'ours': lambda: ours(model, x, method, layer, cls), 'fwd': fwd}   # fwd: the floor's unit
                if method == 'cam': fns['raw'] = lambda: cam_maps(model, x, method, layer, cls)
                for p in peers: fns[p] = functools.partial(run_impl, p, model, x, method, layer, cls)
                t = interleaved(fns, rounds if bs > 1 else rounds + 2)
                cells = [fmt_r(ratio(t, 'ours', p)) if p in peers else '' for p in all_peers]
                # each contender in units of a no_grad forward: ours cannot go below 1 (CAM, Eigen-CAM) or below
                # forward + backward to the layer (gradient methods), so peer/forward bounds the reachable ratio
                extra = f"ours {fmt_r(ratio(t, 'ours', 'fwd'))}" + ''.join(
                    f", {p} {fmt_r(ratio(t, p, 'fwd'))}" for p in peers if p == 'pytorch-grad-cam') + " a forward"
                if method == 'cam': extra = f"raw/forward {fmt_r(ratio(t, 'raw', 'fwd'))}; " + extra
                rows.append([method, layer, bs, fmt_s(med(t['ours'])), *cells, extra, goal_check(method, t, peers)])
                if method == 'gradcam' and learn is not None:    # the call a fastai user makes, maps at input size
                    fns = {'ours': lambda: learn.cam(dl=learn.dls.valid, cls=cls, method=method, layer=layer).maps,
                           'fwd': fwd}
                    for p in peers: fns[p] = functools.partial(run_impl, p, model, x, method, layer, cls)
                    t = interleaved(fns, rounds if bs > 1 else rounds + 2)
                    cells = [fmt_r(ratio(t, 'ours', p)) if p in peers else '' for p in all_peers]
                    rows.append(['gradcam: `learn.cam(dl=).maps`', layer, bs, fmt_s(med(t['ours'])), *cells,
                                 f"ours {fmt_r(ratio(t, 'ours', 'fwd'))} a forward", goal_check(method, t, peers)])
    # Score-CAM: batch 1 only, K masked forwards each; resnet18 (512 channels at layer4, 128 at layer2)
    smodel = resnet('resnet18')
    ssize = 64 if quick else 112
    torch.manual_seed(0)
    x = torch.randn(1, 3, ssize, ssize)
    with torch.no_grad(): cls = smodel(x).argmax(1).tolist(); smodel(torch.randn(32, 3, ssize, ssize))   # warm up
    for layer in (['layer2'] if quick else ['layer4', 'layer2']):
        peers = peers_of('scorecam')
        fns = {'ours': lambda: ours(smodel, x, 'scorecam', layer, cls)}
        for p in peers: fns[p] = functools.partial(run_impl, p, smodel, x, 'scorecam', layer, cls)
        t = interleaved(fns, 1, warmup=0)
        cells = [fmt_r(ratio(t, 'ours', p)) if p in peers else '' for p in all_peers]
        rows.append(['scorecam', layer, 1, fmt_s(med(t['ours'])), *cells, f"resnet18 {ssize}px",
                     goal_check('scorecam', t, peers)])
    rows += seg_speed(quick, rounds)
    print(f"## speed vs the peers ({arch} {size}x{size}, CPU; ours/peer end to end, < 1 = ours faster)\n")
    print(machine() + f"; {rounds} rounds (batch 1: {rounds+2}; Score-CAM: 1); total {time.time()-t0:.0f} s\n")
    print(table(['method', 'layer', 'batch', 'ours', 'vs pytorch-grad-cam', 'vs torchcam', 'vs captum', 'note',
                 'goal'], rows))
    print('\nGoals (issue 5): ' + '; '.join(f"{k}: {v}" for k, v in GOALS.items() if k in ('cam','gradcam','scorecam','eigencam')))

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='small models and inputs, 2 rounds (about a minute)')
    p.add_argument('--part', choices=['all', 'agree', 'speed', 'seg'], default='all',
                   help='seg: only the Seg-Grad-CAM rows (a fastai U-Net vs SemanticSegmentationTarget), both tables')
    p.add_argument('--rounds', type=int, default=None)
    add_common_args(p)
    a = p.parse_args(argv)
    setup(a)
    if a.part in ('all', 'agree'): agreement(a.quick)
    if a.part in ('all', 'speed'): speed(a.quick, a.rounds)
    if a.part == 'seg': seg_tables(a.quick, a.rounds or (2 if a.quick else 3))

if __name__ == '__main__': main()
