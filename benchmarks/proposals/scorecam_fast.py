"""Proposed replacement for fastai_cam.core.scorecam_scores (benchmarks helper's proposal; the lead applies it).

Why: Score-CAM's cost is its N*K masked forwards; ours did exactly what the peers do (torchcam: the same forwards + 1;
pytorch-grad-cam: the same at batch 16), so it was ~0.96-1.0x torchcam and ~0.8-0.95x pytorch-grad-cam, short of
issue 5's <= 0.8x fastest peer. Two exact savings:
1. On CPU, feed the masked inputs in channels_last: oneDNN's NHWC convolutions are 25-32% faster here (resnet18/50,
   no_grad, measured interleaved); the logits agree to float rounding (maps: max diff 4e-7). A model that `.view()`s
   a 4D tensor cannot take channels_last: the first RuntimeError switches back to the default layout.
2. A channel that is constant over the map gets an all-zero mask (minmax of a constant map), so its masked input is
   the zero image whatever the item: one forward of a zero image scores all of them. Small: 1-6% of the channels
   of random resnets at layer4, 0% on the trained demo model; worth it only because it costs nothing.
Measured (1 thread, interleaved, 3 rounds): resnet18 112px layer4 batch 1: proposed/current 0.79-0.81,
proposed/torchcam 0.78-0.79, proposed/pytorch-grad-cam 0.84-0.88; demo small_cnn 64px: ~0.99 of current (its convs
gain nothing from NHWC), 0.88 of both peers. So issue 5's <= 0.8x fastest peer is met only on some runs.
"""
import torch
from torch import Tensor
from fastai_cam.core import _head_logits
from fastai_cam.methods import scorecam_masks

def scorecam_scores(model, x:Tensor, A:Tensor, items:Tensor, classes:Tensor, batch_size:int=32, pbar=None)->Tensor:
    "Target logit of each input masked by each upsampled, min-max normalised channel of `A`: (N,K)"
    N,K = len(items), A.shape[1]
    H,W = x.shape[-2:]
    flat = A.flatten(2)
    live = (flat.amax(-1) > flat.amin(-1))[items]                     # (N,K); a constant channel's mask is all zeros
    pi,ki = live.nonzero(as_tuple=True)                                 # the pairs that need a masked forward
    scores = torch.empty(N, K, device=A.device)
    fmt = torch.channels_last if x.ndim == 4 and x.device.type == 'cpu' else torch.contiguous_format
    def fwd(inp):
        nonlocal fmt
        if fmt is torch.channels_last:
            try: return _head_logits(model(inp.contiguous(memory_format=fmt)))
            except RuntimeError: fmt = torch.contiguous_format          # e.g. a model that .view()s a 4D tensor
        return _head_logits(model(inp))
    with torch.no_grad():
        if not bool(live.all()):                                        # zero masks: the zero image, one forward
            z = fwd(torch.zeros_like(x[:1]))[0].float()
            dead = ~live
            scores[dead] = z[classes[:,None].expand(N, K)[dead]]
        rng = range(0, len(pi), batch_size)
        for s in (pbar(rng) if pbar else rng):
            p,k = pi[s:s+batch_size], ki[s:s+batch_size]
            masks = scorecam_masks(A[items[p], k][:,None], (H,W)).to(x.dtype)      # (b,1,H,W)
            out = fwd(x[items[p]] * masks)
            scores[p,k] = out[torch.arange(len(p), device=out.device), classes[p]].float()
    return scores

if __name__ == '__main__':
    import sys, statistics, time, torchvision
    sys.path.insert(0, 'benchmarks')
    torch.set_num_threads(1)
    import fastai_cam.core as core
    from _common import interleaved, ratio, med, run_impl, ours
    orig = core.scorecam_scores
    def with_(f):
        def g(*a):
            core.scorecam_scores = f
            try: return ours(*a)
            finally: core.scorecam_scores = orig
        return g
    torch.manual_seed(0)
    cases = [('resnet18 112px layer4', torchvision.models.resnet18(weights=None).eval(), 'layer4', torch.randn(1,3,112,112))]
    try:
        from fastai_cam.data import small_cnn, make_digit_scenes
        import pathlib
        f = sorted((pathlib.Path.home()/'.cache'/'fastai_cam').glob('demo_6000*.pth'))
        if f:
            m = small_cnn(); m.load_state_dict(torch.load(f[0])); m.eval()
            imgs,_,_ = make_digit_scenes(2, seed=5)
            xd = (torch.from_numpy(imgs).permute(0,3,1,2).float()/255 - torch.tensor([0.485,0.456,0.406])[:,None,None]) / torch.tensor([0.229,0.224,0.225])[:,None,None]
            cases.append(('trained demo small_cnn, 2 scenes', m, '0', xd))
    except Exception as e: print('no demo model:', e)
    for name, m, layer, x in cases:
        with torch.no_grad(): cls = m(x).argmax(1).tolist()
        acts = core.compute_cams(m, x, 'eigencam', layer, keep_acts=True).acts.flatten(2)
        const = (acts.amax(-1) == acts.amin(-1)).float().mean().item()
        a, b = with_(orig)(m, x, 'scorecam', layer, cls), with_(scorecam_scores)(m, x, 'scorecam', layer, cls)
        fns = {'current': lambda: with_(orig)(m, x, 'scorecam', layer, cls),
               'proposed': lambda: with_(scorecam_scores)(m, x, 'scorecam', layer, cls),
               'torchcam': lambda: run_impl('torchcam', m, x, 'scorecam', layer, cls),
               'pytorch-grad-cam': lambda: run_impl('pytorch-grad-cam', m, x, 'scorecam', layer, cls)}
        t = interleaved(fns, rounds=3, warmup=0)
        print(f"{name}: constant channels {const:.0%}; maps max diff current vs proposed {(a-b).abs().max().item():.1e}")
        for k in fns: print(f"   {k:17s} {med(t[k]):6.2f} s   proposed/{k}: {ratio(t, 'proposed', k):.2f}")
