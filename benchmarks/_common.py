"""Shared helpers of the benchmark scripts: interleaved timing, and every implementation (ours and the peers')
called the way its documentation shows, returning maps at input size, min-max normalised to [0, 1].

Not a test and not part of the package: `python benchmarks/<script>.py` puts this folder on `sys.path`."""
from __future__ import annotations
import contextlib, io, logging, os, platform, statistics, sys, time, warnings
from datetime import date
import torch, torch.nn.functional as F

from fastai_cam.core import cam_maps
from fastai_cam.methods import minmax, upsample

warnings.filterwarnings('ignore', category=FutureWarning)
logging.getLogger('torchcam').setLevel(logging.ERROR)

METHODS = ['cam', 'gradcam', 'gradcam++', 'xgradcam', 'hirescam', 'layercam', 'scorecam', 'eigencam']
GRAD_METHODS = ['gradcam', 'gradcam++', 'xgradcam', 'hirescam', 'layercam']

# ---------------------------------------------------------------------------------------------- timing
def interleaved(fns:dict, rounds:int=5, warmup:int=1)->dict:
    "Run every function once per round, in a rotated order, `rounds` times; seconds per call, by name"
    names = list(fns)
    for _ in range(warmup):
        for n in names: fns[n]()
    times = {n:[] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t = time.perf_counter(); fns[n](); times[n].append(time.perf_counter() - t)
    return times

def ratio(times:dict, a:str, b:str)->float:
    "Median over rounds of `t_a / t_b` measured in the same round (robust to the machine's slow drifts)"
    return statistics.median(x/y for x,y in zip(times[a], times[b]))

def med(ts): return statistics.median(ts)

def fmt_r(r:float)->str: return f"{r:.2f}x"

def fmt_s(s:float)->str: return f"{s*1000:.0f} ms" if s < 10 else f"{s:.1f} s"

def goal_str(r:float, goal:float|None)->str:
    if goal is None: return ''
    return f"<= {goal:g}: {'met' if r <= goal else 'MISSED'}"

def table(header:list, rows:list)->str:
    "A markdown table"
    out = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    out += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(out)

def add_common_args(p):
    p.add_argument('--threads', type=int, default=1,
                   help="torch threads (default 1: on a shared machine torch's OpenMP threads mostly wait for each "
                        "other; 0 = torch's default)")
    return p

def setup(args):
    if args.threads: torch.set_num_threads(args.threads)

def machine(timing:bool=True)->str:
    s = (f"{date.today().isoformat()}, {platform.machine()} CPU x{os.cpu_count()} (torch threads "
         f"{torch.get_num_threads()}), torch {torch.__version__}")
    return s + (", shared machine: timings are noisy, ratios are medians of per-round ratios of interleaved runs"
                if timing else "")

# ---------------------------------------------------------------------------------------------- models
def resnet(name:str='resnet50', seed:int=0):
    "A torchvision resnet with random weights (no downloads), in eval mode"
    import torchvision
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(weights=None).eval()

def get_module(model, name:str): return dict(model.named_modules())[name]

def unet(arch:str='resnet34', size:int=224, bs:int=8, n_out:int=5, seed:int=0):
    "A fastai `DynamicUnet` on a torchvision encoder with random weights (what `unet_learner(pretrained=False)` builds), eval mode, and a batch"
    import torchvision
    from fastai.vision.all import create_unet_model
    torch.manual_seed(seed)
    model = create_unet_model(getattr(torchvision.models, arch), n_out, (size, size), pretrained=False).eval()
    return model, torch.randn(bs, 3, size, size)

# ---------------------------------------------------------------------------------------------- implementations
def ours_raw(model, x, method, layer, cls, **kw):
    return cam_maps(model, x, method=method, layer=layer, cls=cls, **kw)

def ours(model, x, method, layer, cls, **kw):
    "Ours end to end: raw maps, bilinear upsample to the input size, per-map min-max"
    return minmax(upsample(cam_maps(model, x, method=method, layer=layer, cls=cls, **kw), x.shape[-2:]))

def _up(maps, x):
    "Bilinear (align_corners=False) to input size, then min-max: what `ours` does after the raw maps"
    return minmax(upsample(maps.detach().float(), x.shape[-2:]))

# pytorch-grad-cam -------------------------------------------------------------------------------
PGC = {'gradcam':'GradCAM', 'gradcam++':'GradCAMPlusPlus', 'xgradcam':'XGradCAM', 'hirescam':'HiResCAM',
       'layercam':'LayerCAM', 'scorecam':'ScoreCAM', 'eigencam':'EigenCAM'}

def pgc(model, x, method, layer, cls):
    "pytorch-grad-cam: its call returns numpy maps at input size, min-max normalised (cv2 bilinear resize)"
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    Cls = getattr(pytorch_grad_cam, PGC[method])
    with Cls(model=model, target_layers=[get_module(model, layer)]) as c, contextlib.redirect_stderr(io.StringIO()):
        out = c(input_tensor=x, targets=[ClassifierOutputTarget(int(k)) for k in cls])
    return torch.from_numpy(out)

# torchcam -----------------------------------------------------------------------------------------
TC = {'cam':'CAM', 'gradcam':'GradCAM', 'gradcam++':'GradCAMpp', 'xgradcam':'XGradCAM', 'layercam':'LayerCAM',
      'scorecam':'ScoreCAM'}

def torchcam_raw(model, x, method, layer, cls, normalized=True):
    "torchcam as its README shows: hook, forward (no_grad unless gradients are needed), extractor(class_idx, scores)"
    import torchcam.methods as tm
    Cls = getattr(tm, TC[method])
    kw = {'fc_layer':None} if method == 'cam' else {}     # found: the model's only Linear
    with Cls(model, layer, input_shape=tuple(x.shape[1:]), **kw) as ext:
        if method in GRAD_METHODS: scores = model(x)
        else:
            with torch.no_grad(): scores = model(x)
        return ext(class_idx=[int(k) for k in cls], scores=scores, normalized=normalized)[0]

def torchcam(model, x, method, layer, cls):
    "torchcam end to end: its maps (normalised at the layer's resolution), then bilinear to input size and min-max"
    return _up(torchcam_raw(model, x, method, layer, cls), x)

# captum -------------------------------------------------------------------------------------------
def captum_raw(model, x, method, layer, cls):
    "captum's LayerGradCam (Grad-CAM only), with its `relu_attributions=True`"
    assert method == 'gradcam'
    from captum.attr import LayerGradCam
    return LayerGradCam(model, get_module(model, layer)).attribute(x, target=[int(k) for k in cls],
                                                                  relu_attributions=True)[:,0]

def captum(model, x, method, layer, cls):
    "captum end to end: `LayerAttribution.interpolate(..., 'bilinear')` (F.interpolate), then min-max"
    from captum.attr import LayerAttribution
    a = captum_raw(model, x, method, layer, cls)
    return minmax(LayerAttribution.interpolate(a[:,None], tuple(x.shape[-2:]), 'bilinear')[:,0])

PEERS = {'pytorch-grad-cam': (pgc, set(PGC)), 'torchcam': (torchcam, set(TC)), 'captum': (captum, {'gradcam'})}

def peers_of(method:str)->list:
    "Names of the installed peers that implement `method`"
    out = []
    for name,(fn,meths) in PEERS.items():
        if method not in meths: continue
        mod = {'pytorch-grad-cam':'pytorch_grad_cam'}.get(name, name)
        try: __import__(mod)
        except ImportError: continue
        out.append(name)
    return out

def run_impl(name:str, model, x, method, layer, cls):
    "Maps at input size in [0,1] from implementation `name` ('ours' or a peer)"
    if name == 'ours': return ours(model, x, method, layer, cls)
    return PEERS[name][0](model, x, method, layer, cls)

# ---------------------------------------------------------------------------------------------- fastai
def learner_for(model, x):
    "A fastai `Learner` around `model` whose valid `DataLoader` yields `x` as one batch (for the `learn.cam` rows)"
    try:
        from fastai.data.core import DataLoaders
        from fastai.learner import Learner
        import fastai_cam.learner  # noqa: F401  (patches Learner.cam / cam_batch)
        items = list(zip(x, torch.zeros(len(x), dtype=torch.long)))
        dls = DataLoaders.from_dsets(items, items, bs=len(x), shuffle=False, drop_last=False, num_workers=0)
        return Learner(dls, model, loss_func=torch.nn.CrossEntropyLoss())
    except Exception as e:
        print(f"(no learn.cam rows: {e!r})", file=sys.stderr); return None
