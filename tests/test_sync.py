"""No host-device synchronisation in the hot path (issue 15): on the CPU, a `TorchFunctionMode` counts the calls that
would read the device on a GPU while the maps are computed. tools/gpu_check.py runs the same calls on
a GPU under `torch.cuda.set_sync_debug_mode('error')`."""
from contextlib import contextmanager
from functools import partial
from torch.overrides import TorchFunctionMode
import pytest, torch, torch.nn as nn
from fastai.vision.all import vision_learner, resnet18
import fastai_cam.methods as fm
from fastai_cam.methods import METHODS
from fastai_cam.core import compute_cams
from fastai_cam.callback import synth_image_dls
import fastai_cam.learner  # noqa: F401  (patches Learner.cam)

pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py

_SYNCING = {'item', 'tolist', '__bool__', 'nonzero', '__int__', '__float__', '__index__', 'cpu', 'numpy', 'equal',
            'allclose', 'masked_select', 'unique', 'is_nonzero', 'argwhere'}

class _SyncSpy(TorchFunctionMode):
    "Records every torch call that reads the device (and boolean-mask indexing: a data-dependent shape); nothing is patched"
    def __init__(self): super().__init__(); self.calls = []
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, '__name__', '')
        if name in _SYNCING: self.calls.append(name)
        elif name in ('__getitem__', '__setitem__') and len(args) > 1:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx): self.calls.append('bool-index')
        return func(*args, **(kwargs or {}))

@contextmanager
def count_syncs():
    "The calls that synchronise with the device, made in this thread inside the block"
    with _SyncSpy() as spy: yield spy.calls

@pytest.fixture(scope='module')
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Conv2d(3,8,3,padding=1), nn.ReLU(), nn.Conv2d(8,8,3,padding=1,stride=2), nn.ReLU()),
                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8,5))).eval()

def test_the_counter_counts(net):
    "The syncing calls are seen (a check that cannot pass vacuously)"
    x = torch.randn(2,3,16,16)
    with count_syncs() as calls:
        net(x).argmax().item(); bool(net(x).sum() > 0); x[x > 0]; torch.nonzero(x); x[:, 0]
    assert calls == ['item', '__bool__', 'bool-index', 'nonzero']

@pytest.mark.parametrize('cls', [None, 2, [0, 4], [[0, 1], [3]]], ids=['pred', 'int', 'per-item', 'lists'])
def test_no_sync_in_any_method(net, cls, monkeypatch):
    monkeypatch.setattr(fm, 'top_pc', partial(fm.top_pc, sync_free=True))   # Eigen-CAM's GPU route, taken on the CPU
    x = torch.randn(2,3,16,16)
    compute_cams(net, x, 'cam')                     # CAM checks its head once per model and layer: that reads the device
    for m in METHODS:
        with count_syncs() as calls: compute_cams(net, x, m, layer=None if m == 'cam' else '0.2', cls=cls)
        want = ['nonzero'] if m == 'scorecam' else []   # Score-CAM: which masks are not constant, once per call
        assert calls == want, (m, calls)

def test_cam_head_checked_once(net):
    fresh = nn.Sequential(*[m for m in net])        # another model object: its head is checked on its first call
    x = torch.randn(2,3,16,16)
    with count_syncs() as first: compute_cams(fresh, x, 'cam')
    with count_syncs() as then: compute_cams(fresh, x, 'cam')
    assert first and then == []

def test_learn_cam_dl_no_sync_per_batch():
    "learn.cam(dl=) over 1 and over 4 batches: the same count (nothing per batch), with targets in the loader"
    dls = synth_image_dls(n=32, size=16, bs=2)
    learn = vision_learner(dls, resnet18, pretrained=False)
    dl1, dl4 = dls.valid.new(bs=8), dls.valid.new(bs=2)     # 8 validation items: 1 batch, then 4
    learn.cam(dl=dl1, method='gradcam')                     # warm-up
    counts = []
    for dl in (dl1, dl4):
        with count_syncs() as calls, learn.no_bar(): res = learn.cam(dl=dl, method='gradcam')
        counts.append(calls); assert len(res) == 8 and res.targets is not None and len(res.targets) == 8
    assert counts[0] == counts[1], counts
