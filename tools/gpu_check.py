"""GPU check: every method on CUDA in float32, float16 + channels_last and autocast; a fastai learner with `to_fp16()`;
`fastai-cam explain --device cuda`; memory and hooks after a loop; side-by-side timings. Prints one line per check and
exits 1 if any check fails. `python tools/gpu_check.py [--out DIR]` (needs a CUDA device; a few minutes at most)."""
import argparse, sys, tempfile, traceback
from pathlib import Path
import torch, torchvision
import matplotlib; matplotlib.use('Agg')
from fastai_cam.all import *
from fastai_cam.methods import METHODS, minmax
from fastai_cam.callback import n_hooks
sys.path.insert(0, str(Path(__file__).resolve().parents[1]/'benchmarks'))
from _common import interleaved, med, run_impl, peers_of

FAILED = []
DEV = 'cuda'   # --dry-run: 'cpu', a quick rehearsal of the logic (no Score-CAM, no timings)
def check(name, ok, detail=''):
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    if not ok: FAILED.append(name)

def guarded(f):
    def g(*a, **k):
        try: return f(*a, **k)
        except Exception: traceback.print_exc(); check(f.__name__, False, 'raised')
    return g

def corr(a, b):
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    c = (a*b).sum(1) / (a.norm(dim=1)*b.norm(dim=1)).clamp_min(1e-12)
    both_flat = (a.norm(dim=1) < 1e-6) & (b.norm(dim=1) < 1e-6)      # e.g. a Grad-CAM map that the ReLU zeroes out
    return torch.where(both_flat, torch.ones_like(c), c).min().item()

def maps_of(model, x, method, layer, cls, **kw):
    return minmax(cam_maps(model, x, method=method, layer=layer, cls=cls, **kw))

@guarded
def methods_on_cuda(dry=False):
    torch.manual_seed(0)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False   # fp32 comparisons: no TF32
    cpu = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    gpu = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    gpu.load_state_dict(cpu.state_dict()); gpu.to(DEV)
    x = torch.randn(4, 3, 96, 96)
    cls = [1, 3, 5, 7]
    meths = [m for m in METHODS if not (dry and m == 'scorecam')]
    for m in meths:
        for layer in ([None] if m == 'cam' else [None, 'layer2']):
            kw = dict(batch_size=256) if m == 'scorecam' else {}
            if m == 'scorecam' and layer == 'layer2': continue
            ref = maps_of(cpu, x, m, layer, cls, **kw)
            out = cam_maps(gpu, x.to(DEV), method=m, layer=layer, cls=cls, **kw)
            check(f"fp32 cuda == cpu  {m:9s} {layer or 'auto'}", out.device.type == DEV and out.dtype == torch.float32
                  and (minmax(out).cpu() - ref).abs().max().item() < 1e-3,
                  f"max diff {(minmax(out).cpu() - ref).abs().max().item():.1e}")
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    # float16 weights and inputs in channels_last, and autocast: the same maps, up to half precision
    half = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    half.load_state_dict(cpu.state_dict())
    half = half.to(DEV).half().to(memory_format=torch.channels_last)
    xh = x.to(DEV).half().contiguous(memory_format=torch.channels_last)
    for m in meths:
        kw = dict(batch_size=256) if m == 'scorecam' else {}
        ref = maps_of(gpu, x.to(DEV), m, None, cls, **kw)
        out = cam_maps(half, xh, method=m, cls=cls, **kw)
        ok = out.dtype == torch.float32 and bool(torch.isfinite(out).all())
        c = corr(minmax(out), ref)
        check(f"fp16 channels_last {m:9s}", ok and c > 0.98, f"corr with fp32 {c:.4f}")
        with torch.autocast(DEV, dtype=torch.float16):
            out = cam_maps(gpu, x.to(DEV), method=m, cls=cls, **kw)
        c = corr(minmax(out), ref)
        check(f"autocast fp16      {m:9s}", bool(torch.isfinite(out).all()) and c > 0.98, f"corr with fp32 {c:.4f}")

@guarded
def no_leaks_on_cuda():
    model = torchvision.models.resnet50(weights=None).to(DEV).eval()
    x = torch.randn(8, 3, 224, 224, device=DEV)
    for m in ('gradcam', 'cam', 'eigencam'): cam_maps(model, x, method=m)
    if DEV == 'cuda': torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() if DEV == 'cuda' else 0
    for i in range(30): cam_maps(model, x, method=('gradcam', 'layercam', 'cam')[i % 3], layer=(None, 'layer2', None)[i % 3])
    if DEV == 'cuda': torch.cuda.synchronize()
    after = torch.cuda.memory_allocated() if DEV == 'cuda' else 0
    check("30 calls: CUDA memory back to baseline", after <= base, f"{base/2**20:.1f} -> {after/2**20:.1f} MiB")
    check("no hook, no .grad, eval flags", n_hooks(model) == 0 and all(p.grad is None for p in model.parameters())
          and not any(mm.training for mm in model.modules()))

@guarded
def fastai_learner_fp16(out):
    from fastai.vision.all import Learner, ConvLayer, accuracy, nn, PILImage
    dls = synth_image_dls(n=256, size=64, bs=32)
    dls.to(DEV)
    body = nn.Sequential(ConvLayer(3, 16, stride=2), ConvLayer(16, 32, stride=2), ConvLayer(32, 64))
    model = nn.Sequential(body, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3)))
    learn = Learner(dls, model, metrics=accuracy, cbs=[CAMCallback(), GradCAMCallback(layer='0.1')])
    if DEV == 'cuda': learn = learn.to_fp16()
    else: learn.model.to(DEV)
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-2)
    acc = float(learn.validate()[1])
    check("fastai fit to_fp16 on cuda", next(learn.model.parameters()).device.type == DEV, f"valid accuracy {acc:.3f}")
    flags = [m.training for m in learn.model.modules()]
    grads = [None if p.grad is None else p.grad.clone() for p in learn.model.parameters()]   # fit leaves zeroed grads
    item = dls.valid_ds[0][0]
    with learn.no_bar(): pred = learn.predict(item)
    r = learn.cam_cb.result
    check("predict: CAMResult on cuda, finite", r.raw.device.type == DEV and bool(torch.isfinite(r.maps).all()), f"pred {pred[0]}")
    check("predict leaves no hook", n_hooks(learn.model) == 0, f"{n_hooks(learn.model)} hooks")
    check("predict leaves the parameters' .grad as they were", all((g is None and p.grad is None) or
          (g is not None and p.grad is not None and torch.equal(g, p.grad)) for g,p in zip(grads, learn.model.parameters())))
    check("predict leaves every training flag", flags == [m.training for m in learn.model.modules()])
    with learn.no_bar(): res = learn.cam(dl=dls.valid, method='gradcam', layer='0.1')
    xb = dls.valid.one_batch()[0]
    direct = cam_maps(learn.model, xb, method='gradcam', layer='0.1')
    c = corr(res.raw[:len(xb)].float().to(DEV), direct.float())   # learn.cam runs under fastai's autocast
    check("learn.cam(dl) ~ cam_maps on the first batch", c > 0.99, f"corr {c:.5f}")
    axs = learn.show_cam(dl=dls.valid, max_n=8, ncols=4)
    axs[0].figure.savefig(Path(out)/'gpu_show_cam.png', dpi=60, bbox_inches='tight')
    # explain over a folder with the exported learner, on cuda
    tmp = Path(tempfile.mkdtemp())
    learn.remove_cbs([learn.cam_cb, learn.gradcam_cb]); learn.export(tmp/'model.pkl')
    imgs = tmp/'imgs'; imgs.mkdir()
    for i in range(20): dls.valid_ds[i % len(dls.valid_ds)][0].save(imgs/f'{i:02d}.png')
    from fastai_cam.cli import main
    rc = main(['explain', str(tmp/'model.pkl'), str(imgs), '-o', str(tmp/'out'), '--device', DEV, '-q'])
    n = len(list((tmp/'out').rglob('*.png')))
    check("fastai-cam explain --device cuda", rc == 0 and n == 20, f"rc {rc}, {n} overlays")

def bench(fns, reps=20, warmup=3):
    "Median seconds per call of each function, interleaved as in benchmarks/, each call ending in a CUDA sync"
    synced = {k: (lambda f=f: (f(), torch.cuda.synchronize())) for k, f in fns.items()}
    return {k: med(v) for k, v in interleaved(synced, reps, warmup).items()}

@guarded
def no_host_sync():
    "Every method (Score-CAM excepted: it reads which masks are constant, once) and learn.cam(dl=) with the device in sync-debug 'error' mode"
    if DEV != 'cuda': print("SKIP  sync-debug mode needs CUDA (tests/test_sync.py counts the same calls on the CPU)"); return
    model = torchvision.models.resnet50(weights=None).cuda().eval().half().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 224, 224, device='cuda').half().contiguous(memory_format=torch.channels_last)
    cam_maps(model, x, method='cam')                       # CAM checks its head once per model and layer
    for m in [k for k in METHODS if k != 'scorecam']:
        for cls in (None, 3, list(range(8)), [[0, 1]] + [[2]]*7):
            torch.cuda.set_sync_debug_mode('error')
            try: cam_maps(model, x, method=m, layer=None if m == 'cam' else 'layer2', cls=cls); ok, err = True, ''
            except RuntimeError as e: ok, err = False, str(e).splitlines()[0]
            finally: torch.cuda.set_sync_debug_mode(0)
            check(f"no host sync  {m:9s} cls={str(cls)[:12]}", ok, err)
    from fastai.vision.all import vision_learner, resnet18
    dls = synth_image_dls(n=128, size=64, bs=16); dls.to(DEV)
    learn = vision_learner(dls, resnet18, pretrained=False); learn.model.to(DEV)
    with learn.no_bar(): learn.cam(dl=dls.valid, method='gradcam')
    torch.cuda.set_sync_debug_mode('error')
    try:
        with learn.no_bar(): learn.cam(dl=dls.valid, method='gradcam'); ok, err = True, ''
    except RuntimeError as e: ok, err = False, str(e).splitlines()[0]
    finally: torch.cuda.set_sync_debug_mode(0)
    check("no host sync  learn.cam(dl=) over 2 batches", ok, err)

GOALS = {'cam@layer4': 1.10, 'gradcam@layer4': 1.20, 'gradcam@layer2': 1.60, 'eigencam@layer4': 1.50}   # issue 15

@guarded
def timings():
    model = torchvision.models.resnet50(weights=None).cuda().eval().half().to(memory_format=torch.channels_last)
    for bs in (16, 64):
        x = torch.randn(bs, 3, 224, 224, device='cuda').half().contiguous(memory_format=torch.channels_last)
        def fwd():
            with torch.no_grad(): model(x)
        fns = {'forward': fwd, **{f'{m}@{l or "layer4"}': (lambda m=m, l=l: cam_maps(model, x, method=m, layer=l))
               for m, l in [('cam', None), ('gradcam', None), ('gradcam', 'layer2'), ('layercam', 'layer2'),
                            ('eigencam', None), ('eigencam', 'layer2')]}}
        fns['cam + maps at input size'] = lambda: CAMResult(cam_maps(model, x), None, None, None, None, (224, 224), 'cam', '').maps
        def eigen_tf32():   # TF32 matmuls switched on, as many users do: top_pc must not stall (it runs them in full fp32)
            was = torch.get_float32_matmul_precision(); torch.set_float32_matmul_precision('high')
            try: cam_maps(model, x, method='eigencam', layer='layer2')
            finally: torch.set_float32_matmul_precision(was)
        fns['eigencam@layer2 tf32'] = eigen_tf32
        t = bench(fns)
        print(f"resnet50 224px batch {bs}, fp16 channels_last, median ms and ratio to a no_grad forward:")
        for k, v in t.items():
            r, g = v/t['forward'], GOALS.get(k)
            print(f"   {k:26s} {v*1e3:8.2f} ms  {r:5.2f}x" + (f"  goal <= {g}: {'met' if r <= g else 'NOT met'}" if g else ''))
    from fastai_cam.learner import _Batches
    from fastai.vision.all import vision_learner, resnet50 as r50
    dls = synth_image_dls(n=1024, size=224, bs=64); dls.to(DEV)
    learn = vision_learner(dls, r50, pretrained=False); learn.model.to(DEV); learn.to_fp16()
    def run(pf):
        _Batches.prefetch = pf
        with learn.no_bar(): learn.cam(dl=dls.valid, method='gradcam')
    def preds():
        with learn.no_bar(): learn.get_preds(dl=dls.valid)
    t = bench({'learn.cam(dl=) prefetch': lambda: run(True), 'learn.cam(dl=) inline': lambda: run(False),
               'learn.get_preds': preds}, reps=5, warmup=1)
    _Batches.prefetch = True
    print(f"learn.cam(dl=) over {len(dls.valid_ds)} images (resnet50 to_fp16, bs 64): prefetch {t['learn.cam(dl=) prefetch']:.2f} s, "
          f"inline {t['learn.cam(dl=) inline']:.2f} s, get_preds {t['learn.get_preds']:.2f} s")
    x = torch.randn(16, 3, 224, 224, device='cuda').half().contiguous(memory_format=torch.channels_last)
    x1 = x[:1]
    def masked():   # what Score-CAM must do at least: 2048 masked forwards
        with torch.no_grad():
            for s in range(0, 2048, 256): model(x1.expand(256, -1, -1, -1))
    t = bench({'2048 masked forwards': masked, 'scorecam b1': lambda: cam_maps(model, x1, method='scorecam', batch_size=256)}, reps=3)
    print(f"   Score-CAM batch 1: {t['scorecam b1']*1e3:.1f} ms = {t['scorecam b1']/t['2048 masked forwards']:.2f}x its masked forwards")

@guarded
def peers_gpu():
    "Ours vs pytorch-grad-cam, torchcam, captum end to end (maps at input size in [0,1]) on CUDA, float32, interleaved"
    model = torchvision.models.resnet50(weights=None).cuda().eval()
    x = torch.randn(16, 3, 224, 224, device='cuda'); cls = list(range(16))
    print("resnet50 224px float32 on CUDA, end to end; median ms; ours/peer (< 1: ours faster); max |ours - peer|:")
    for method, layer, n in [('gradcam', 'layer4', 16), ('gradcam', 'layer2', 16), ('gradcam', 'layer2', 1),
                             ('layercam', 'layer2', 16), ('eigencam', 'layer4', 16), ('scorecam', 'layer4', 1)]:
        xx, c = x[:n], cls[:n]
        names = ['ours'] + peers_of(method)
        if len(names) == 1: print(f"   {method}: no peer installed"); continue
        maps = {k: run_impl(k, model, xx, method, layer, c).float().cpu() for k in names}
        fns = {k: (lambda k=k: run_impl(k, model, xx, method, layer, c)) for k in names}
        slow = method == 'scorecam'
        t = bench(fns, reps=3 if slow else 10, warmup=1 if slow else 3)
        row = '  '.join(f"{k} {t[k]*1e3:.1f} ms" + ('' if k == 'ours' else
                        f" ({t['ours']/t[k]:.2f}x, diff {(maps['ours'] - maps[k]).abs().max().item():.1e})") for k in names)
        print(f"   {method}@{layer} b{n}: {row}", flush=True)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--out', default='.', help="folder for gpu_show_cam.png")
    p.add_argument('--dry-run', action='store_true', help="rehearse on the CPU (no Score-CAM, no timings)")
    args = p.parse_args()
    if args.dry_run: DEV = 'cpu'
    elif not torch.cuda.is_available(): sys.exit("no CUDA device")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'}", flush=True)
    methods_on_cuda(args.dry_run); no_leaks_on_cuda(); no_host_sync(); fastai_learner_fp16(args.out)
    if not args.dry_run: timings(); peers_gpu()
    print(f"{len(FAILED)} failed: {FAILED}" if FAILED else "all checks passed")
    sys.exit(1 if FAILED else 0)
