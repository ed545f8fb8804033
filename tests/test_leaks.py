"""Many calls leave nothing behind: no hook, no autograd graph, no growing memory, no parameter gradient."""
import gc, os, weakref
import pytest
import torch, torch.nn as nn
from fastai.vision.all import vision_learner, resnet18
from fastai_cam.core import cam_maps
from fastai_cam.callback import n_hooks, synth_image_dls, GradCAMCallback
import fastai_cam.learner    # noqa: F401  (patches Learner.cam)

N = 300

pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py

def rss_mb():
    "Resident memory of this process, from /proc/self/statm (pages)"
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20

def n_tensors():
    gc.collect()
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())   # type(): no attribute lookups

class GraphSpy:
    "Weak references to the logits (the root of the graph) and to what the layer hands the next module"
    def __init__(self, last:nn.Module, after_layer:nn.Module):
        self.refs = []
        self.hs = [last.register_forward_hook(lambda m, i, o: self.add(o)),
                   after_layer.register_forward_pre_hook(lambda m, i: self.add(i[0]))]
    def add(self, t): self.refs.append((weakref.ref(t), t.grad_fn is not None))
    def remove(self):
        for h in self.hs: h.remove()
    def alive(self):
        gc.collect()
        return [r for r,_ in self.refs if r() is not None]

def check_loop(call, model, spy_modules):
    for _ in range(20): call()                 # warm-up: allocator, lazy inits
    t0, m0 = n_tensors(), rss_mb()
    spy = GraphSpy(*spy_modules)
    for i in range(N):
        out = call()
        assert out.grad_fn is None and not out.requires_grad
        if i == 0:
            spy.remove()
            assert len(spy.refs) >= 2 and all(g for _,g in spy.refs)                       # there was a graph...
            del out
            assert spy.alive() == []                                                       # ...and it is gone
    del out
    t1, m1 = n_tensors(), rss_mb()
    assert n_hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert t1 - t0 <= 5, (t0, t1)
    assert m1 - m0 < 30, f'resident memory grew by {m1 - m0:.1f} MB over {N} calls'
    assert torch.is_grad_enabled()

def test_cam_maps_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                          nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.ReLU(inplace=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    x = torch.randn(4, 3, 32, 32)
    check_loop(lambda: cam_maps(model, x, method='gradcam', layer='3', cls=[[0, 1], [2], [3], [4]]), model,
               (model[7], model[4]))

def test_cam_maps_loop_other_methods():
    "A shorter loop over the other gradient methods and Score-CAM (it runs many forwards)"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(2, 3, 16, 16)
    meths = ['gradcam++', 'xgradcam', 'hirescam', 'layercam', 'scorecam', 'eigencam']
    for _ in range(5):
        for m in meths: cam_maps(model, x, method=m, layer='0')
    t0, m0 = n_tensors(), rss_mb()
    for _ in range(20):
        for m in meths:
            out = cam_maps(model, x, method=m, layer='0')
            assert out.grad_fn is None and not out.requires_grad
    del out
    assert n_tensors() - t0 <= 5 and rss_mb() - m0 < 30
    assert n_hooks(model) == 0 and all(p.grad is None for p in model.parameters())

@pytest.fixture(scope='module')
def learn():
    dls = synth_image_dls(n=16, size=32, bs=8)
    return vision_learner(dls, resnet18, pretrained=False)

def test_learn_cam_loop(learn):
    img = learn.dls.valid_ds[0][0]
    model = learn.model
    check_loop(lambda: learn.cam(img, method='gradcam', layer='0.5').raw, model, (model[1][-1], model[0][6]))
    assert not learn.cbs.filter(lambda c: 'cam' in type(c).__name__.lower())   # no callback left attached

def test_predict_loop_with_callback(learn):
    "The attached callback over many predictions: no hook between calls, only the last result kept"
    img = learn.dls.valid_ds[0][0]
    cb = GradCAMCallback(layer='0.5')
    learn.add_cb(cb)
    try:
        for _ in range(10): learn.predict(img)
        t0, m0 = n_tensors(), rss_mb()
        for _ in range(100):
            learn.predict(img)
            assert n_hooks(learn.model) == 0 and cb.result.raw.grad_fn is None
        assert learn.pred.grad_fn is None
        assert n_tensors() - t0 <= 5 and rss_mb() - m0 < 30
        assert all(p.grad is None for p in learn.model.parameters()) and torch.is_grad_enabled()
    finally: learn.remove_cb(cb)
