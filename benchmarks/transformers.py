"""Speed of `cam_maps` on a vision transformer (issue 10): a ViT-S/16-shaped timm model (`vit_small_patch16_224`,
random weights), 224x224, batch 16, CPU. Prints markdown tables of ratios (ours / baseline), measured interleaved in
one run: the median over rounds of the per-round ratio.

- Grad-CAM at the automatic layer (`blocks[-1].norm1`) against a forward hook + `torch.autograd.grad` written by
  hand on the same layer, the tokens reshaped by hand and the Grad-CAM formula (asserted to give the same maps);
- against pytorch-grad-cam's `GradCAM` with a `reshape_transform` written correctly for the class token, same layer
  and class: time, and the maps compared raw (its `get_cam_image` + ReLU on its own hooked activations and
  gradients, before its resize and normalisation) and at input size (both min-max normalised after a bilinear resize);
- attention rollout (`method='rollout'`) against a plain `no_grad` forward, and gradient-weighted rollout
  (`method='gradrollout'`) against a forward + backward (`autograd.grad` of the explained logits to the input).

    python benchmarks/transformers.py                # 224px, batch 16, 5 rounds, 1 torch thread
    python benchmarks/transformers.py --threads 2    # the same with 2 torch threads (torch's default here)
    python benchmarks/transformers.py --quick        # 112px (7x7 tokens), batch 4, 2 rounds (a smoke run)
    python benchmarks/transformers.py --profile      # also: torch.profiler's top operators of each contender
"""
from __future__ import annotations
import argparse, contextlib, io, os, time
import torch
from _common import *

def loadavg()->str:
    try: return ', '.join(f"{l:.2f}" for l in os.getloadavg())
    except OSError: return 'n/a'

def vit(size:int, seed:int=0):
    "timm's `vit_small_patch16_224` (ViT-S/16: 12 blocks, 384 channels, 6 heads, a class token), random weights, eval mode"
    import timm
    torch.manual_seed(seed)
    return timm.create_model('vit_small_patch16_224', pretrained=False, img_size=size).eval()

def tokens_to_grid(model):
    "What a user writes by hand: drop the class token, the (B,N,C) tokens to (B,C,h,w) on the model's patch grid"
    P,(h,w) = model.num_prefix_tokens, model.patch_embed.grid_size
    return lambda t: t[:, P:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)

def gradcam_by_hand(model, layer, x, cls, start_at_layer:bool):
    """Forward hook on `layer` + `torch.autograd.grad` of the selected logits to its output, tokens reshaped by hand,
    `ReLU(sum_k mean_ij(G_k) A_k)`. `start_at_layer`: the forward runs under `no_grad` and the hook makes the layer's
    output a leaf that requires grad (nothing before the layer is recorded: the least work); otherwise the whole
    forward records the graph, as the textbook recipe does"""
    to_grid, store, B = tokens_to_grid(model), {}, len(x)
    def hook(m, i, o):
        if start_at_layer:
            torch.set_grad_enabled(True)
            o = o.detach().requires_grad_()
        store['a'] = o
        return o
    def run_maps():
        h = layer.register_forward_hook(hook)
        try:
            with (torch.no_grad() if start_at_layer else contextlib.nullcontext()):
                logits = model(x)
                a = store['a']
                g, = torch.autograd.grad(logits[torch.arange(B), cls].sum(), a)
        finally: h.remove(); store.clear()
        A, G = to_grid(a.detach()), to_grid(g)
        return (G.mean((2, 3))[:, :, None, None] * A).sum(1).relu()
    return run_maps

def pgc_gradcam(model, layer, x, cls, raw:bool=False):
    """pytorch-grad-cam's `GradCAM` with the right `reshape_transform`: its maps at input size in [0,1] (its call), or
    with `raw`, the map on the patch grid before its resize and normalisation (`get_cam_image` + ReLU, as it computes)"""
    import numpy as np
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    targets = [ClassifierOutputTarget(int(k)) for k in cls]
    with GradCAM(model=model, target_layers=[layer], reshape_transform=tokens_to_grid(model)) as c, \
         contextlib.redirect_stderr(io.StringIO()):
        out = c(input_tensor=x, targets=targets)
        if raw:
            ag = c.activations_and_grads
            cam = c.get_cam_image(x, layer, targets, ag.activations[0].numpy(), ag.gradients[0].numpy())
            return torch.from_numpy(np.maximum(cam, 0)), torch.from_numpy(out)
    return torch.from_numpy(out)

def rel_diff(a, b)->float:
    "max |a - b| / max |b|"
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()

def profile(fns:dict, names:list, n:int=15):
    "torch.profiler's top operators (self CPU time) of one call of each contender"
    from torch.profiler import profile as prof, ProfilerActivity
    for k in names:
        fns[k]()
        with prof(activities=[ProfilerActivity.CPU]) as p: fns[k]()
        print(f"\n#### profile: {k}\n\n```\n" +
              p.key_averages().table(sort_by='self_cpu_time_total', row_limit=n, max_name_column_width=50) + "```")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='112px, batch 4, 2 rounds: a smoke run (not a measurement)')
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--bs', type=int, default=16)
    p.add_argument('--rounds', type=int, default=None, help='interleaved rounds (default 5, quick 2)')
    p.add_argument('--part', default='all', choices=['all', 'gradcam', 'rollout'],
                   help='gradcam: Grad-CAM against the hand-written minimum and pytorch-grad-cam; rollout: the two rollouts')
    p.add_argument('--no-peer', action='store_true', help='skip pytorch-grad-cam')
    p.add_argument('--profile', action='store_true', help="print torch.profiler's top operators of each contender")
    add_common_args(p)
    a = p.parse_args(argv)
    setup(a)
    rounds = a.rounds or (2 if a.quick else 5)
    if a.quick: a.size, a.bs = 112, 4
    load0, t0 = loadavg(), time.time()
    model = vit(a.size)
    torch.manual_seed(1)
    x = torch.randn(a.bs, 3, a.size, a.size)
    with torch.no_grad(): cls = model(x).argmax(1)
    B, layer = len(x), model.blocks[-1].norm1
    from fastai_cam.core import find_layer
    name, auto = find_layer(model, None)
    assert auto is layer, f"the automatic layer is {name!r}, not blocks[-1].norm1"

    gs = 'x'.join(map(str, model.patch_embed.grid_size))
    rows, checks = [], []
    def add(label, times, a_, b_, goal=None):
        r = ratio(times, a_, b_)
        rows.append([label, fmt_s(med(times[a_])), fmt_s(med(times[b_])), fmt_r(r), goal_str(r, goal)])

    def fwd():
        with torch.no_grad(): return model(x)
    xg = x.clone().requires_grad_()
    def fwd_bwd():
        "forward + backward: `autograd.grad` of the explained logits to the input (no parameter gradients)"
        logits = model(xg)
        return torch.autograd.grad(logits[torch.arange(B), cls].sum(), xg)[0]

    prof_fns = {}
    # --- Grad-CAM at the automatic layer vs the hand-written minimum (same maps, asserted)
    if a.part != 'rollout':
        tight, plain = gradcam_by_hand(model, layer, x, cls, True), gradcam_by_hand(model, layer, x, cls, False)
        gc = lambda: cam_maps(model, x, 'gradcam', cls=cls)
        m_ours, m_tight, m_plain = gc(), tight(), plain()
        for lbl, m in (('no_grad up to the layer', m_tight), ('graph from the input', m_plain)):
            d = rel_diff(m_ours, m)
            checks.append([f"Grad-CAM `cam_maps` vs hook + `autograd.grad` by hand ({lbl}), raw {gs} maps",
                           f"{d:.1e} (of max)", 'same maps' if d <= 1e-5 else 'DIFFER'])
            assert d <= 1e-5, f"cam_maps and the hand-written Grad-CAM ({lbl}) differ by {d:.2e} of the map's max"
        fns = {'ours': gc, 'tight': tight, 'plain': plain, 'fwd': fwd}
        t = interleaved(fns, rounds)
        add("`cam_maps(method='gradcam')` (automatic layer `blocks.11.norm1`) / hook + `autograd.grad` by hand, "
            "forward under `no_grad`, the hook starts autograd at the layer (the least work)", t, 'ours', 'tight', 1.10)
        add("`cam_maps(method='gradcam')` / hook + `autograd.grad` by hand, the whole forward recording the graph "
            "(the textbook recipe)", t, 'ours', 'plain', 1.10)
        add("`cam_maps(method='gradcam')` / plain `no_grad` forward (for scale)", t, 'ours', 'fwd')
        add("hook + `autograd.grad` by hand (least work) / plain `no_grad` forward (for scale)", t, 'tight', 'fwd')
        prof_fns.update(fns)

    # --- against pytorch-grad-cam
    if a.part != 'rollout' and not a.no_peer:
        try: import pytorch_grad_cam  # noqa: F401
        except ImportError: a.no_peer = True; print("(pytorch-grad-cam is not installed: no peer rows; pip install grad-cam)")
        if not a.no_peer:
            raw_peer, up_peer = pgc_gradcam(model, layer, x, cls, raw=True)
            up_ours = ours(model, x, 'gradcam', None, cls)
            d_raw, d_up = rel_diff(m_ours, raw_peer), (up_ours - up_peer).abs().max().item()
            checks.append([f"Grad-CAM `cam_maps` vs pytorch-grad-cam, raw {gs} maps (its `get_cam_image` + ReLU, before "
                           "resizing)", f"{d_raw:.1e} (of max)", 'same maps' if d_raw <= 1e-5 else 'DIFFER'])
            checks.append([f"the same at {a.size}x{a.size} in [0,1] (ours: bilinear `upsample` + `minmax`; its call: cv2 resize + "
                           "min-max)", f"{d_up:.1e}", 'same maps' if d_up <= 1e-5 else 'DIFFER'])
            fns = {'ours_e2e': lambda: ours(model, x, 'gradcam', None, cls), 'ours_raw': gc,
                   'pgc': lambda: pgc_gradcam(model, layer, x, cls), 'fwd': fwd}
            t = interleaved(fns, rounds)
            add("ours end to end (`cam_maps` + `upsample` + `minmax`) / pytorch-grad-cam `GradCAM` (its call, maps at "
                "input size in [0,1])", t, 'ours_e2e', 'pgc', 0.5)
            add(f"`cam_maps(method='gradcam')` (raw {gs}) / pytorch-grad-cam `GradCAM`", t, 'ours_raw', 'pgc', 0.5)
            add("pytorch-grad-cam `GradCAM` / plain `no_grad` forward (for scale)", t, 'pgc', 'fwd')
            prof_fns['pgc'] = fns['pgc']

    # --- attention rollout
    if a.part != 'gradcam':
        ro, gro = lambda: cam_maps(model, x, 'rollout'), lambda: cam_maps(model, x, 'gradrollout', cls=cls)
        assert ro().shape == gro().shape == (B, *model.patch_embed.grid_size)
        fns = {'rollout': ro, 'fwd': fwd, 'gradrollout': gro, 'fwd_bwd': fwd_bwd}
        t = interleaved(fns, rounds)
        add("`cam_maps(method='rollout')` (12 blocks, mean fusion) / plain `no_grad` forward", t, 'rollout', 'fwd', 1.3)
        add("`cam_maps(method='gradrollout')` / forward + backward (`autograd.grad` of the explained logits to the input), "
            "for information", t, 'gradrollout', 'fwd_bwd')
        add("forward + backward / plain `no_grad` forward (for scale)", t, 'fwd_bwd', 'fwd')
        prof_fns.update(fns)

    total = time.time() - t0
    print(f"## transformers: Grad-CAM and attention rollout on a ViT (vit_small_patch16_224, random weights, "
          f"{a.size}x{a.size}, batch {a.bs}, CPU)\n")
    print(machine() + f"; {rounds} rounds; total {total:.0f} s; load average (1, 5, 15 min) {load0} at the start, "
          f"{loadavg()} at the end\n")
    print(table(['measurement', 'ours', 'baseline', 'ratio', 'goal'], rows))
    if checks: print('\n' + table(['agreement (predicted class of each image)', 'max abs diff', ''], checks))
    if a.profile: profile(prof_fns, [k for k in ('ours', 'tight', 'rollout', 'fwd', 'gradrollout', 'fwd_bwd') if k in prof_fns])

if __name__ == '__main__': main()
