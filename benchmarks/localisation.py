"""Localisation of every method, ours and the peers': the pointing game and the energy pointing game on the demo's
trained model (`fastai_cam.data.demo_learner`, a small GAP->Linear CNN on digit scenes) and its held-out scenes,
whose digit boxes are known. Maps for the true class, at the layer feeding the pooling head.

    python benchmarks/localisation.py           # 500 held-out scenes (Score-CAM: the first 100)
    python benchmarks/localisation.py --quick   # a smaller model (2000 scenes, 5 epochs), 100 scenes (Score-CAM: 20)

The trained weights are cached in ~/.cache/fastai_cam/ (training takes minutes on 2 busy CPU cores); --retrain."""
from __future__ import annotations
import argparse, time
from pathlib import Path
import torch
from _common import *
from fastai_cam.metrics import pointing_game, energy_pointing_game

CACHE = Path.home()/'.cache'/'fastai_cam'

def trained_learner(quick:bool, retrain:bool=False):
    "The demo learner (`demo_learner`'s data and model), trained once and then loaded from the cache"
    from fastai.vision.all import Learner, accuracy, set_seed
    from fastai_cam.data import demo_learner, digit_dls, small_cnn
    kw = dict(n_train=2000, n_valid=200, epochs=5) if quick else dict(n_train=6000, n_valid=1000, epochs=8)
    f = CACHE/f"demo_{kw['n_train']}_{kw['n_valid']}_{kw['epochs']}.pth"
    if f.exists() and not retrain:
        set_seed(0)
        learn = Learner(digit_dls(kw['n_train'], kw['n_valid'], seed=0), small_cnn(), metrics=accuracy)
        learn.model.load_state_dict(torch.load(f))
        return learn, f"loaded from {f}"
    t = time.time()
    learn = demo_learner(progress=False, **kw)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(learn.model.state_dict(), f)
    return learn, f"`demo_learner({', '.join(f'{k}={v}' for k, v in kw.items())})` trained in {time.time()-t:.0f} s"

def maps_of(impl, model, x, method, layer_name, cls, bs):
    "Maps at input size in [0,1] in batches of `bs`"
    return torch.cat([run_impl(impl, model, x[i:i+bs], method, layer_name, cls[i:i+bs]) for i in range(0, len(x), bs)])

def centre_prior(n, H, W):
    "A Gaussian bump at the image centre: the baseline any map should beat"
    ys, xs = torch.arange(H)[:,None] + 0.5 - H/2, torch.arange(W)[None] + 0.5 - W/2
    return torch.exp(-(xs**2 + ys**2) / (2*(H/4)**2)).expand(n, H, W)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='small model, 100 scenes (about a minute once cached)')
    p.add_argument('--n', type=int, default=None, help='held-out scenes to score (default 500, quick 100)')
    p.add_argument('--n-scorecam', type=int, default=None, help='scenes for Score-CAM (default 100, quick 20)')
    p.add_argument('--tol', type=float, default=0, help="pointing game tolerance in pixels (Zhang et al. use 15 at 224px)")
    p.add_argument('--retrain', action='store_true')
    add_common_args(p)
    a = p.parse_args(argv)
    setup(a)
    t0 = time.time()
    learn, how = trained_learner(a.quick, a.retrain)
    model = learn.model.eval()
    n = a.n or (100 if a.quick else 500)
    ns = a.n_scorecam or (20 if a.quick else 100)
    dl = learn.dls.valid.new(shuffle=False, drop_last=False, bs=256)
    xs, ys = [], []
    for xb, yb in dl:
        xs.append(xb); ys.append(yb)
        if sum(len(v) for v in xs) >= n: break
    x, y = torch.cat(xs)[:n].as_subclass(torch.Tensor), torch.cat(ys)[:n].as_subclass(torch.Tensor)
    boxes = learn.dls.boxes[:n]
    with torch.no_grad(): acc = (model(x).argmax(1) == y).float().mean().item()
    layer = find_layer_name(model)
    cls = y.tolist()
    rows = []
    H, W = x.shape[-2:]
    prior = centre_prior(n, H, W)
    rows.append(['centre prior (baseline)', '', n, f"{pointing_game(prior, boxes, tol=a.tol):.3f}",
                 f"{energy_pointing_game(prior, boxes):.3f}"])
    for method in METHODS:
        m = ns if method == 'scorecam' else n
        for impl in ['ours'] + peers_of(method):
            maps = maps_of(impl, model, x[:m], method, layer, cls[:m], 64)
            rows.append([method, impl, m, f"{pointing_game(maps, boxes[:m], tol=a.tol):.3f}",
                         f"{energy_pointing_game(maps, boxes[:m]):.3f}"])
    print(f"## localisation on the demo's held-out digit scenes ({H}x{W}, layer {layer!r}, true class)\n")
    print(f"{machine(timing=False)}; model {how}; valid accuracy on these scenes {acc:.3f}; total {time.time()-t0:.0f} s\n")
    print(table(['method', 'implementation', 'scenes', f"pointing game (tol {a.tol:g} px)", 'energy pointing game'],
                rows))

def find_layer_name(model):
    from fastai_cam.core import find_layer
    return find_layer(model, None)[0]

if __name__ == '__main__': main()
