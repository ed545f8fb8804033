"""Targets beyond class logits (issue 11): every ready-made target against a hand-written forward hook and
`torch.autograd.grad` of the same score, a dict-output torchvision model, the automatic layer of models without a
pooling module (VGG, DenseNet, fastai's U-Net), a small U-Net trained here whose Seg-Grad-CAM points at the digit,
regression and point learners, and the errors.

The references never go through `fastai_cam`'s hooks or targets: a plain forward hook keeps the layer's output, the
score is written out again from the model's output, and `gradcam` (tested in tests/test_gradcam.py) turns
activations and gradients into maps."""
import pytest
import torch, torch.nn as nn, torchvision
from fastai.vision.all import unet_learner, vision_learner, set_seed, Learner, CrossEntropyLossFlat
from fastai_cam.core import cam_maps, compute_cams, find_layer, map_layer, n_hooks, LayerError
from fastai_cam.methods import gradcam
from fastai_cam.targets import ClassTarget, RegionTarget, RegressionTarget, PointTarget, OutputField
from fastai_cam.data import digit_dls, small_encoder, small_cnn
from fastai_cam.learner import count_forwards, cam_titles    # also patches `Learner.cam`

pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py

def close(a, b, tol=1e-5): torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)

def by_hand(model, x, layer, score):
    "Grad-CAM of each column of `score(out)` ((B,) or (B,T)): a forward hook, then `torch.autograd.grad` per column"
    st = {}   # the hook hands on a copy, so that an in-place op downstream (DenseNet's ReLU) leaves the output as it was
    h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: st.__setitem__('a', o) or o.clone())
    try: out = model(x)
    finally: h.remove()
    s = score(out)
    s = s[:, None] if s.ndim == 1 else s
    A = st['a']
    maps = [gradcam(A.detach(), torch.autograd.grad(s[:, t].sum(), A, retain_graph=True)[0]) for t in range(s.shape[1])]
    return torch.stack(maps, 1).flatten(0, 1)          # item-major, as `cam_maps` orders (item, column) pairs

@pytest.fixture(scope='module')
def unet():
    "A random-init fastai U-Net (small encoder) and a batch whose predictions hold both classes"
    set_seed(0)
    m = unet_learner(digit_dls(16, 8, size=32, digit_size=(10, 14), bs=8, task='mask'), small_encoder, pretrained=False).model.eval()
    with torch.no_grad(): m.layers[-2][0].bias.copy_(torch.tensor([0., 0.3]))   # some pixels of each class
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(): pred = m(x).argmax(1)
    assert (pred == 0).any() and (pred == 1).any()
    return m, x

def test_region_target_predicted_pixels(unet):
    m, x = unet
    hand = lambda c: lambda o: (o[:, c] * (o.argmax(1) == c)).flatten(1).sum(1)
    for c in (0, 1):
        close(cam_maps(m, x, 'gradcam', target=RegionTarget(c)), by_hand(m, x, 'layers.5', hand(c)))
    both = lambda o: torch.stack([hand(0)(o), hand(1)(o)], 1)
    close(cam_maps(m, x, 'gradcam', target=RegionTarget()), by_hand(m, x, 'layers.5', both))   # a map per class
    close(cam_maps(m, x, 'gradcam', layer='layers.4', target=RegionTarget(1)), by_hand(m, x, 'layers.4', hand(1)))

def test_region_target_mask_and_box(unet):
    m, x = unet
    mask = torch.zeros(3, 32, 32); mask[:, 4:20, 8:30] = 1; mask[1, :, :16] = 0.5          # one per item, weights too
    close(cam_maps(m, x, 'gradcam', target=RegionTarget(1, mask=mask)),
          by_hand(m, x, 'layers.5', lambda o: (o[:, 1] * mask).flatten(1).sum(1)))
    box = torch.zeros(32, 32); box[3:9, 2:17] = 1                                           # rows 3..8, columns 2..16
    close(cam_maps(m, x, 'gradcam', target=RegionTarget(0, box=(2, 3, 17, 9))),
          by_hand(m, x, 'layers.5', lambda o: (o[:, 0] * box).flatten(1).sum(1)))

def test_class_regression_point_targets():
    torch.manual_seed(0)
    net = nn.Sequential(*small_cnn(6, ch=(8, 16), strides=(2, 1))).eval()     # body, head: a (B,6) output
    x = torch.randn(2, 3, 16, 16)
    for tgt, ref in [(ClassTarget(4), lambda o: o[:, 4]), (ClassTarget([1, 5]), lambda o: o[:, [1, 5]]),
                     (RegressionTarget(), lambda o: o), (RegressionTarget([2, 0]), lambda o: o[:, [2, 0]]),
                     (PointTarget(2, 'y'), lambda o: o[:, 5]), (PointTarget(1), lambda o: o[:, 2:4]),
                     (OutputField(0, ClassTarget(3)), lambda o: o[:, 3])]:
        model,layer = (nn.Sequential(net, _Tuple()), '0.0') if isinstance(tgt, OutputField) else (net, '0')
        close(cam_maps(model, x, 'gradcam', layer=layer, target=tgt), by_hand(net, x, '0', ref))
    close(cam_maps(net, x, 'gradcam', layer='0', target=ClassTarget(4)), cam_maps(net, x, 'gradcam', layer='0', cls=4))

class _Tuple(nn.Module):
    "Turn logits into a tuple (an auxiliary output after them), as some models return"
    def forward(self, o): return (o, o.sum(1))

def test_dict_output_lraspp():
    "torchvision's LR-ASPP returns {'out': ...}: a region of its output, at the layer the issue names"
    torch.manual_seed(0)
    m = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): out = m(x)['out']
    c = int(out.argmax(1).flatten().mode().values)
    hand = lambda o: (o['out'][:, c] * (o['out'].argmax(1) == c)).flatten(1).sum(1)
    ref = by_hand(m, x, 'backbone.16', hand)
    assert ref.flatten(1).amax(1).min() > 0
    close(cam_maps(m, x, 'gradcam', layer='backbone.16', target=RegionTarget(c)), ref)
    close(cam_maps(m, x, 'gradcam', layer='backbone.16', target=OutputField('out', RegionTarget(c))), ref)
    assert n_hooks(m) == 0

@pytest.mark.parametrize('arch', ['vgg11', 'densenet121'])
def test_automatic_layer_vgg_densenet(arch):
    "No pooling module (their pooling is functional): the traced layer is `features`, the same maps as by hand there"
    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)(weights=None, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): cls = m(x).argmax(1)
    with count_forwards(m) as c: maps = cam_maps(m, x, 'gradcam')
    assert c.n == 2                                                           # the trace, then the maps' forward
    assert find_layer(m)[0] == 'features'                                     # cached: no input needed now
    close(maps, by_hand(m, x, 'features', lambda o: o[torch.arange(2), cls]))
    with count_forwards(m) as c: cam_maps(m, x, 'gradcam')
    assert c.n == 1 and n_hooks(m) == 0
    with pytest.raises(LayerError, match='has no global pooling layer'): cam_maps(m, x, 'cam')   # CAM needs a pooling head

def test_seg_learner_points_at_the_digit():
    """A U-Net trained here on digit scenes (the digit's ink is the object): Seg-Grad-CAM of the object class at the
    automatic layer (the last decoder block) peaks on the digit in at least 85% of the held-out scenes"""
    set_seed(0)
    dls = digit_dls(400, 100, size=32, digit_size=(10, 14), bs=32, task='mask')
    learn = unet_learner(dls, small_encoder, pretrained=False)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(5, 1e-2)
    res = learn.cam(dl=dls.valid, cls='digit')
    assert (res.layer, res.method, res.kind) == ('layers.5', 'gradcam', 'segmentation')
    assert res.items.tolist() == list(range(100)) and res.labels == ['digit'] * 100
    pred = res.preds == 1
    dice = 2 * (pred & dls.valid_masks).sum() / (pred.sum() + dls.valid_masks.sum())
    assert dice > 0.8, dice
    peak = res.maps.flatten(1).argmax(1)
    hit = dls.valid_masks.flatten(1)[torch.arange(100), peak] & ~res.blank
    assert hit.float().mean() >= 0.85, hit.float().mean()
    every = learn.cam(dl=dls.valid)                             # every class present in each prediction
    assert len(every) == sum(len(p.unique()) for p in every.preds)
    assert n_hooks(learn.model) == 2                             # the U-Net's own skip-connection hooks only

@pytest.mark.parametrize('task', ['point', 'size'])
def test_point_and_regression_learners(task):
    "A map per output, the same as `cam_maps` with the matching target; titles show the predicted value"
    set_seed(0)
    dls = digit_dls(16, 8, size=32, digit_size=(10, 14), bs=8, task=task)
    learn = vision_learner(dls, small_encoder, pretrained=False, **({'y_range': (-1, 1)} if task == 'point' else {}))
    imgs = list(dls.valid_imgs[:3])
    res = learn.cam(imgs, method='gradcam')
    n = 2 if task == 'point' else 1
    assert res.kind == ('points' if task == 'point' else 'regression') and res.classes.tolist() == list(range(n)) * 3
    xb = learn.dls.test_dl(imgs).one_batch()[0]
    tgt = PointTarget(0) if task == 'point' else RegressionTarget()
    close(res.raw, cam_maps(learn.model, xb, 'gradcam', target=tgt))
    with torch.no_grad(): out = learn.model.eval()(xb)
    close(res.probs, out.flatten())                                          # the explained values: the outputs
    vals = ((out[:, :2] + 1) * 16).flatten() if task == 'point' else out.flatten()
    assert [float(t.split()[-1].rstrip('px')) for t in cam_titles(res)] == pytest.approx(vals.tolist(), rel=2e-3, abs=1e-3)
    res = learn.cam(imgs, method='gradcam', cls=1 if task == 'point' else 0)   # one output asked for
    assert res.classes.tolist() == [1 if task == 'point' else 0] * 3

def test_errors(unet):
    m, x = unet
    with pytest.raises(ValueError, match=r"The mask is 16x16 but the model's output is 32x32"):
        cam_maps(m, x, 'gradcam', target=RegionTarget(1, mask=torch.ones(16, 16)))
    with pytest.raises(ValueError, match='segmentation output'):
        cam_maps(small_cnn().eval(), torch.randn(1, 3, 32, 32), 'gradcam', target=RegionTarget(1))
    with pytest.raises(IndexError, match=r'Class 5 is out of range'): cam_maps(m, x, 'gradcam', target=RegionTarget(5))
    with pytest.raises(LayerError, match='DynamicUnet has no global pooling layer'): cam_maps(m, x, 'cam')
    with pytest.raises(LayerError, match=r'no U-Net decoder blocks, and no module whose output is a feature map'):
        cam_maps(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.randn(2, 3, 2, 2), 'gradcam')
    learn = unet_learner(digit_dls(16, 8, size=32, digit_size=(10, 14), bs=8, task='mask'), small_encoder, pretrained=False)
    with count_forwards(learn.model) as c:
        with pytest.raises(ValueError, match=r"Unknown class 'building'. The vocab is: \['background', 'digit'\]"):
            learn.cam(torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(), cls='building')
    assert c.n == 0
