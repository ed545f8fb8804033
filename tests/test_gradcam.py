"""The Grad-CAM family against independent computations, over real architectures, and its edge cases.

The references below never go through `fastai_cam`'s hooks or method functions: the model is split by hand
(`model[:j+1]` / `model[j+1:]`), the gradient comes from a plain `torch.autograd.grad`, and each formula of
DESIGN.md is written out again in float64.
"""
import copy
import pytest
import torch, torch.nn as nn, torch.nn.functional as F, torchvision
from fastai.vision.all import (Learner, vision_learner, xresnet18, resnet18, densenet121, squeezenet1_0,
                               ConvLayer, Callback, BCEWithLogitsLossFlat, set_seed)
from fastai_cam.core import cam_maps, compute_cams, find_layer, LayerError, LayerOutputError
from fastai_cam.methods import METHODS
from fastai_cam.callback import n_hooks, synth_image_dls, GradCAMCallback, CAMCallback, learner_vocab
from fastai_cam.learner import count_forwards    # also patches `Learner.cam`

GRAD_METHODS = ['gradcam', 'gradcam++', 'xgradcam', 'hirescam', 'layercam']
FAMILY = GRAD_METHODS + ['scorecam', 'eigencam']

pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py

def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)

def no_grads(model): return all(p.grad is None for p in model.parameters())

def randomize_bn(model, seed=0):
    "Random-init BatchNorm has identity stats and (fastai's `BatchZero`) zero weights: make them non-trivial"
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean.data = torch.randn(n, generator=g) * 0.1
            m.running_var.data = torch.rand(n, generator=g) + 0.5
    return model

# ---------------------------------------------------------------- independent references

def small_net(seed=0, K=6, C=4):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, K, 3, padding=1, stride=2), nn.ReLU(),      # 3: conv (signed), 4: relu (>= 0)
                      nn.Conv2d(K, K, 3, padding=1), nn.ReLU(),                # gradients vary in space
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(K, C))
    return randomize_bn(m, seed).eval()

def ref_acts_grads(model, j, x, items, classes):
    "A = output of model[j], G = d logit / dA for each (item, class), by splitting the Sequential by hand"
    with torch.no_grad(): A = model[:j+1](x)
    leaf = A.clone().requires_grad_()
    out = model[j+1:](leaf)
    G = torch.stack([torch.autograd.grad(out[i, c], leaf, retain_graph=True)[0][i] for i, c in zip(items, classes)])
    return A[items].double(), G.double()

def ref_map(method, A, G=None, model=None, x=None, items=None, classes=None):
    "Each formula of DESIGN.md, written out in float64"
    relu = lambda t: t.clamp(min=0)
    wsum = lambda w: relu((w[:, :, None, None] * A).sum(1))
    if method == 'gradcam':  return wsum(G.mean((2, 3)))
    if method == 'gradcam++':
        S = A.sum((2, 3), keepdim=True)
        alpha = G**2 / (2*G**2 + S*G**3 + 1e-7)
        alpha = torch.where(G == 0, torch.zeros_like(alpha), alpha)
        return wsum((alpha * relu(G)).sum((2, 3)))
    if method == 'xgradcam': return wsum((A*G).sum((2, 3)) / (A.sum((2, 3)) + 1e-7))
    if method == 'hirescam': return relu((G*A).sum(1))
    if method == 'layercam': return relu((relu(G)*A).sum(1))
    if method == 'eigencam':
        maps = []
        for a in A:
            X = a.flatten(1).T                                   # (hw, K)
            X = X - X.mean(0)
            v = torch.linalg.svd(X, full_matrices=False)[2][0]
            p = X @ v
            if torch.corrcoef(torch.stack([p, a.mean(0).flatten()]))[0, 1] < 0: p = -p
            maps.append(relu(p).view(a.shape[1:]))
        return torch.stack(maps)
    if method == 'scorecam':
        H, W = x.shape[-2:]
        maps = []
        for a, i, c in zip(A, items, classes):
            scores = []
            for k in range(a.shape[0]):
                m = F.interpolate(a[k][None, None].float(), size=(H, W), mode='bilinear', align_corners=False)[0, 0]
                m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else torch.zeros_like(m)
                with torch.no_grad(): scores.append(model(x[i:i+1] * m)[0, c].double())
            w = torch.softmax(torch.stack(scores), 0)
            maps.append(relu((w[:, None, None] * a).sum(0)))
        return torch.stack(maps)
    raise ValueError(method)

@pytest.mark.parametrize('j', [3, 4], ids=['conv', 'relu'])
@pytest.mark.parametrize('method', FAMILY)
def test_matches_reference(method, j):
    model = small_net()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    for cls in (None, [[0, 2], [1]], 3):
        logits = model(x).detach()
        if cls is None: items, classes = [0, 1], logits.argmax(1).tolist()
        elif cls == 3: items, classes = [0, 1], [3, 3]
        else: items, classes = [0, 0, 1], [0, 2, 1]
        A, G = ref_acts_grads(model, j, x, items, classes)
        ref = ref_map(method, A, G, model, x, items, classes)
        got = cam_maps(model, x, method=method, layer=model[j], cls=cls)
        assert got.dtype == torch.float32 and got.shape == (len(items), 6, 6)
        close(got, ref)
        if method == 'scorecam': close(cam_maps(model, x, method=method, layer=model[j], cls=cls, batch_size=5), ref)
        if method in ('gradcam', 'eigencam', 'layercam'): assert ref.sum() > 0   # the comparison is not 0 == 0
    assert n_hooks(model) == 0 and no_grads(model)

def test_class_forms_agree():
    "An int, a list, a tensor, a numpy array, a callable and lists of lists all name the same (item, class) pairs"
    import numpy as np
    model = small_net()
    x = torch.randn(3, 3, 12, 12)
    for m in ('gradcam', 'layercam', 'scorecam'):
        ref = torch.stack([cam_maps(model, x[i:i+1], method=m, layer='3', cls=c)[0] for i, c in enumerate([2, 0, 3])])
        for cls in ([2, 0, 3], torch.tensor([2, 0, 3]), np.array([2, 0, 3]), [[2], 0, [3]],
                    lambda lg: (torch.arange(3), torch.tensor([2, 0, 3]))):
            close(cam_maps(model, x, method=m, layer='3', cls=cls), ref)
        item2_cls0 = cam_maps(model, x[2:], method=m, layer='3', cls=0)[0]
        close(cam_maps(model, x, method=m, layer='3', cls=[[2, 2], [], [0]]), torch.stack([ref[0], ref[0], item2_cls0]))
        assert cam_maps(model, x, method=m, layer='3', cls=[[], [], []]).shape == (0, 6, 6)
        close(cam_maps(model, x, method=m, layer='3', cls=np.int64(1)), cam_maps(model, x, method=m, layer='3', cls=1))

def test_gradcam_pp_zero_gradients_are_exercised():
    "The reference test above really meets G == 0 (ReLU after the layer), where alpha must be 0, not NaN"
    model = small_net()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    _, G = ref_acts_grads(model, 3, x, [0, 1], [0, 0])
    assert (G == 0).any() and (G != 0).any()

def test_gradcam_is_relu_cam_over_hw_at_gap_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).eval()
    x = torch.randn(3, 3, 10, 14)
    with torch.no_grad(): A = model[:3](x)
    W = model[5].weight.detach()
    for c in range(4):
        cam = torch.einsum('k,nkhw->nhw', W[c], A)
        assert (cam > 0).any() and (cam < 0).any()
        h, w = A.shape[-2:]
        close(cam_maps(model, x, method='gradcam', layer='2', cls=c), cam.clamp(min=0) / (h*w))
        close(cam_maps(model, x, method='cam', layer='2', cls=c), cam)         # and CAM itself is Zhou's formula

# ---------------------------------------------------------------- sweeps over real architectures

def out_shapes(model, x, types):
    "Output shape (of the last call) of every module of the given types, by plain forward hooks"
    shapes, hs = {}, []
    for n, m in model.named_modules():
        if n and isinstance(m, types):
            hs.append(m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape) if isinstance(o, torch.Tensor) else None)))
    with torch.no_grad(): model(x)
    for h in hs: h.remove()
    return shapes

def sweep(model, x, scorecam_layers):
    types = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Sequential)
    shapes = {n: s for n, s in out_shapes(model, x, types).items() if s is not None and len(s) == 4}
    names = list(shapes)
    kinds = {type(m) for n, m in model.named_modules() if n in shapes}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.ReLU} <= kinds and any(issubclass(k, nn.Sequential) for k in kinds)
    others = ['gradcam++', 'xgradcam', 'hirescam', 'layercam']
    n_nonzero = 0
    for i, n in enumerate(names):
        # every layer: gradcam and eigencam; the other gradient methods in turn (each sees every kind of layer)
        methods = ['gradcam', 'eigencam', others[i % 4]] + (['scorecam'] if n in scorecam_layers else [])
        for meth in methods:
            xx = x[:1] if meth == 'scorecam' else x
            m = cam_maps(model, xx, method=meth, layer=n, cls=1)
            assert m.shape == (len(xx),) + shapes[n][2:], (n, meth, m.shape)
            assert m.isfinite().all(), (n, meth)
            assert m.grad_fn is None and not m.requires_grad
            assert n_hooks(model) == 0, (n, meth)
            n_nonzero += bool(m.abs().sum() > 0)
        assert no_grads(model), n
    assert set(scorecam_layers) <= set(names)
    return names, n_nonzero

def test_sweep_torchvision_resnet18():
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=3)).eval()
    names, nz = sweep(model, torch.randn(2, 3, 32, 32), ['layer1.0.relu', 'layer2.0.downsample'])
    assert {'layer1.0.relu', 'layer4.1.bn2', 'layer3.0.downsample', 'layer4', 'conv1'} <= set(names)
    assert len(names) >= 50 and nz > len(names)        # most maps are not all-zero

def test_sweep_xresnet18():
    model = randomize_bn(xresnet18(n_out=3)).eval()
    names, nz = sweep(model, torch.randn(2, 3, 32, 32), ['4.0.convpath.0', '4.1.idpath'])
    assert {'4.0.idpath', '4.0.act', '0.0', '7.1.convpath.1.1'} <= set(names)   # incl. empty Sequential (identity)
    assert len(names) >= 70 and nz > len(names)
    with pytest.raises(LayerOutputError, match="'9'"): cam_maps(model, torch.randn(1, 3, 32, 32), 'gradcam', layer='9')   # Flatten
    with pytest.raises(LayerOutputError, match="'11'"): cam_maps(model, torch.randn(1, 3, 32, 32), 'gradcam', layer='11')  # Linear

def test_module_called_twice():
    "torchvision's BasicBlock calls its `relu` twice: the map is the one of the last call (the block's output)"
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=3)).eval()
    x = torch.randn(2, 3, 32, 32)
    for m in GRAD_METHODS + ['eigencam']:
        a, b = cam_maps(model, x, method=m, layer='layer2.1.relu', cls=1), cam_maps(model, x, method=m, layer='layer2.1', cls=1)
        close(a, b, 1e-6)
        assert m == 'gradcam' or b.sum() > 0

def test_tuple_output():
    "A model whose forward returns (logits, extra): the first output is the logits"
    class Two(nn.Module):
        def __init__(self): super().__init__(); self.net = small_net()
        def forward(self, x):
            a = self.net[:5](x)
            return self.net[5:](a), a.mean()
    two = Two().eval()
    x = torch.randn(2, 3, 12, 12)
    for m in FAMILY: close(cam_maps(two, x, method=m, layer='net.3', cls=1), cam_maps(two.net, x, method=m, layer='3', cls=1), 1e-6)

def check_arch(model, x, layer=None, methods=('gradcam', 'layercam', 'eigencam')):
    model = randomize_bn(model).eval()
    name = layer
    for meth in methods:
        out = compute_cams(model, x, method=meth, layer=layer, cls=0, keep_acts=True)
        assert out.maps.shape == (len(x),) + out.acts.shape[2:] and out.maps.isfinite().all()
        assert out.acts.shape[-1] > 1 and out.maps.abs().sum() > 0 or meth == 'gradcam'
        assert n_hooks(model) == 0 and no_grads(model)
    return model

@pytest.mark.parametrize('arch', ['mobilenet_v3_small', 'efficientnet_b0', 'convnext_tiny'])
def test_torchvision_archs_auto_layer(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=3)
    assert find_layer(model)[0] == 'features'        # not a squeeze-and-excitation pool inside the body
    x = torch.randn(1, 3, 64, 64)
    model = check_arch(model, x)
    # the automatic layer is the one feeding the pooling head, so CAM is defined there
    assert cam_maps(model, x, method='cam', cls=0).isfinite().all()

@pytest.mark.parametrize('arch,layer,size', [('googlenet', 'inception5b', 64), ('inception_v3', 'Mixed_7c', 160)])
def test_auxiliary_classifiers_skipped(arch, layer, size):
    "googlenet registers aux1/aux2 (inception: AuxLogits) beside the body: the auto layer is the one the pooling gets"
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=3, init_weights=False)
    assert find_layer(model)[0] == layer
    x = torch.randn(1, 3, size, size)
    model = check_arch(model, x)
    close(cam_maps(model, x, 'gradcam', cls=1), cam_maps(model, x, 'gradcam', layer=layer, cls=1))
    assert cam_maps(model, x, method='cam', cls=1).isfinite().all()    # the head [avgpool, dropout, fc] checks out

def test_densenet121_needs_a_layer():
    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None, num_classes=3)
    x = torch.randn(1, 3, 64, 64)
    assert find_layer(model, x=x)[0] == 'features'        # pooling is functional: the layer comes from a traced forward
    with pytest.raises(LayerError, match='layer='): cam_maps(model, x, method='cam')      # no pooling head: no CAM
    check_arch(model, x, layer='features')
    check_arch(model, x, layer='features.denseblock3.denselayer2.conv1', methods=('gradcam++',))

def test_vgg11_bn_no_global_pool():
    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn(weights=None, num_classes=3)
    x = torch.randn(1, 3, 64, 64)
    assert find_layer(model, x=x)[0] == 'features'        # the last feature map, not the resampling `avgpool`
    with pytest.raises(LayerError, match='layer='): cam_maps(model, x, method='cam')
    check_arch(model, x, layer='features.24', methods=('gradcam', 'hirescam', 'eigencam'))

def test_timm_cnn():
    timm = pytest.importorskip('timm')
    model = timm.create_model('resnet18', pretrained=False, num_classes=3)
    check_arch(model, torch.randn(1, 3, 64, 64))

def _img(dls, i=0): return dls.valid_ds[i][0]

@pytest.fixture(scope='module')
def dls(): return synth_image_dls(n=16, size=32, bs=8)

@pytest.mark.parametrize('arch,layer', [(resnet18, '0.5'), (densenet121, None), (squeezenet1_0, None)],
                         ids=['resnet18', 'densenet121', 'squeezenet1_0'])
def test_vision_learner_archs(dls, arch, layer):
    set_seed(0)
    learn = vision_learner(dls, arch, pretrained=False)
    imgs = [_img(dls, 0), _img(dls, 1)]
    res = learn.cam(imgs, method='gradcam', layer=layer)
    xb = learn.dls.test_dl(imgs).one_batch()[0]
    acts = compute_cams(learn.model, xb, method='eigencam', layer=layer, keep_acts=True).acts
    assert res.raw.shape == (2,) + acts.shape[2:] and res.raw.isfinite().all()
    assert res.maps.shape == (2, 32, 32) and ((res.maps >= 0) & (res.maps <= 1)).all()
    close(res.raw, cam_maps(learn.model, xb, method='gradcam', layer=layer))
    assert n_hooks(learn.model) == 0 and no_grads(learn.model) and torch.is_grad_enabled()

# ---------------------------------------------------------------- in-place ops, grad modes, train mode, frozen

def inplace_pair():
    torch.manual_seed(0)
    def make(inplace):
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(6, 6, 3, padding=1),
                             nn.BatchNorm2d(6), nn.ReLU(inplace=inplace), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    a = randomize_bn(make(True)).eval()
    b = make(False).eval(); b.load_state_dict(a.state_dict())
    return a, b

@pytest.mark.parametrize('layer', ['0', '2', '3'])
def test_inplace_relu_after_layer(layer):
    a, b = inplace_pair()
    x = torch.randn(2, 3, 8, 8)
    for meth in GRAD_METHODS + ['eigencam']:
        ma, mb = cam_maps(a, x, method=meth, layer=layer, cls=[0, 2]), cam_maps(b, x, method=meth, layer=layer, cls=[0, 2])
        close(ma, mb, 1e-6)
        j = int(layer)
        A, G = ref_acts_grads(b, j, x, [0, 1], [0, 2])
        assert (A < 0).any()                        # the activations we keep were not ReLU'd in place
        close(ma, ref_map(meth, A, G))
    assert n_hooks(a) == 0 and no_grads(a)

def test_under_no_grad_and_inputs():
    model = small_net()
    x = torch.randn(2, 3, 12, 12)
    ref = {m: cam_maps(model, x, method=m, layer='3') for m in FAMILY}
    with torch.no_grad():
        for m in FAMILY:
            close(cam_maps(model, x, method=m, layer='3'), ref[m], 1e-6)
            assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    xg = x.clone().requires_grad_()
    for m in GRAD_METHODS:
        out = cam_maps(model, xg, method=m, layer='3')
        close(out, ref[m], 1e-6)
        assert out.grad_fn is None and xg.grad is None
    assert not x.requires_grad and no_grads(model)

def test_inference_mode():
    model = small_net()
    x = torch.randn(2, 3, 12, 12)
    ref = {m: cam_maps(model, x, method=m, layer='3') for m in FAMILY}
    with torch.inference_mode():
        xi = x.clone()
        for m in FAMILY:
            close(cam_maps(model, xi, method=m, layer='3'), ref[m], 1e-6)
            assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    assert n_hooks(model) == 0 and no_grads(model) and torch.is_grad_enabled()

def test_train_mode_and_bn_stats_restored():
    model = small_net().train()
    model[2].eval()                                  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 12, 12)
    ev = copy.deepcopy(model).eval()
    for meth in FAMILY + ['cam']:
        layer = '6' if meth == 'cam' else '3'
        got = cam_maps(model, x, method=meth, layer=layer)
        close(got, cam_maps(ev, x, method=meth, layer=layer), 1e-6)     # computed in eval mode
        assert [m.training for m in model.modules()] == flags, meth
        for k, v in model.state_dict().items(): assert torch.equal(v, state[k]), (meth, k)   # BN running stats
    assert no_grads(model)

def test_frozen_model():
    model = small_net()
    x = torch.randn(2, 3, 12, 12)
    ref = {m: cam_maps(model, x, method=m, layer='4', cls=1) for m in GRAD_METHODS}
    for p in model.parameters(): p.requires_grad_(False)
    for m in GRAD_METHODS:
        close(cam_maps(model, x, method=m, layer='4', cls=1), ref[m], 1e-6)
        assert ref[m].sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    # a fastai-frozen learner too: body frozen, head trainable
    learn = vision_learner(synth_image_dls(n=8, bs=4), resnet18, pretrained=False)
    learn.freeze()
    rg = [p.requires_grad for p in learn.model.parameters()]
    res = learn.cam(_img(learn.dls), method='gradcam', layer='0.6')
    assert res.raw.shape == (1, 2, 2) and res.raw.isfinite().all()
    assert [p.requires_grad for p in learn.model.parameters()] == rg and no_grads(learn.model)

# ---------------------------------------------------------------- bad input: clear errors before any work

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.aux = nn.Conv2d(4, 4, 1)          # called, output thrown away
        self.never = nn.Conv2d(4, 4, 1)        # never called
        self.vec = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())   # 2D output, not a Linear
        self.fc = nn.Linear(4, 3)
    def forward(self, x):
        a = self.body(x)
        _ = self.aux(a)
        return self.fc(self.vec(a))

def test_bad_layers_and_methods():
    model = Branchy().eval()
    x = torch.randn(2, 3, 8, 8)
    with count_forwards(model) as c:
        with pytest.raises(LayerOutputError, match="'fc'"): cam_maps(model, x, 'gradcam', layer='fc')
        with pytest.raises(LayerOutputError, match="'fc'"): cam_maps(model, x, 'gradcam', layer=model.fc)
        with pytest.raises(ValueError, match=r'gradcam\+\+.*layercam.*scorecam.*eigencam'): cam_maps(model, x, 'grad-kam', layer='body')
        with pytest.raises(LayerError, match='body'): cam_maps(model, x, 'gradcam', layer='bdy')
        with pytest.raises(ValueError, match='3 classes for a batch of 2'): cam_maps(model, x, 'gradcam', layer='body', cls=[0, 1, 2])
        with pytest.raises(ValueError, match='1 classes for a batch of 2'): cam_maps(model, x, 'gradcam', layer='body', cls=[[0, 1]])
        for m in FAMILY:   # a layer after the global pooling has no feature map
            with pytest.raises(LayerOutputError, match=r"'vec' \(Sequential\) comes after the global pooling"): cam_maps(model, x, m, layer='vec')
    assert c.n == 0                                     # all refused before a forward pass
    for m in GRAD_METHODS:
        with pytest.raises(LayerError, match="does not depend on layer 'aux'"): cam_maps(model, x, m, layer='aux')
    for m in FAMILY:
        with pytest.raises(LayerError, match="'never' did not run"): cam_maps(model, x, m, layer='never')
    with pytest.raises(IndexError, match='out of range'): cam_maps(model, x, 'gradcam', layer='body', cls=3)
    assert n_hooks(model) == 0 and no_grads(model) and torch.is_grad_enabled()

def test_zero_gradient_gives_zero_map():
    model = small_net()
    with torch.no_grad(): model[-1].weight[2] = 0          # class 2 does not depend on the features
    x = torch.randn(2, 3, 12, 12)
    for m in GRAD_METHODS:
        out = cam_maps(model, x, method=m, layer='4', cls=2)
        assert torch.equal(out, torch.zeros(2, 6, 6)), m
        assert cam_maps(model, x, method=m, layer='4', cls=1).sum() > 0

def test_forward_raising_restores_everything():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__(); self.net = small_net(); self.boom = True
        def forward(self, x):
            a = self.net[:5](x)
            if self.boom: raise RuntimeError('boom')
            return self.net[5:](a)
    model = Boom()
    x = torch.randn(2, 3, 12, 12)
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            for m in FAMILY:
                with pytest.raises(RuntimeError, match='boom'): cam_maps(model, x, m, layer='net.3')
                assert torch.is_grad_enabled() == grad_mode, (m, grad_mode)
                assert n_hooks(model) == 0
    model.boom = False
    assert cam_maps(model, x, 'gradcam', layer='net.3').shape == (2, 6, 6)

# ---------------------------------------------------------------- the callback

def tiny_cnn(n_out=3):
    return nn.Sequential(nn.Sequential(ConvLayer(3, 8, stride=2), ConvLayer(8, 16, stride=2)),
                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, n_out)))

class Spy(Callback):
    "Runs after the CAM callback: records whether the prediction the rest of fastai sees carries a graph"
    order = 90
    def before_validate(self): self.seen = []
    def after_pred(self): self.seen.append((self.learn.pred.requires_grad, self.learn.pred.grad_fn))

def test_gradcam_callback_predict_and_get_preds(dls):
    set_seed(0)
    spy = Spy()
    learn = Learner(dls, tiny_cnn(), cbs=[GradCAMCallback(method='layercam', layer='0.0'), spy])
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            lbl, idx, probs = learn.predict(_img(dls))
            assert torch.is_grad_enabled() == grad_mode
        r = learn.gradcam_cb.result
        assert r.raw.shape == (1, 16, 16) and r.raw.grad_fn is None
        assert spy.seen == [(False, None)]
        assert n_hooks(learn.model) == 0 and no_grads(learn.model)
        assert not learn.pred.requires_grad
    preds, targs = learn.get_preds(dl=dls.valid)
    assert preds.grad_fn is None and spy.seen == [(False, None)] * len(dls.valid)
    r = learn.gradcam_cb.result
    assert r.raw.shape == (len(dls.valid_ds), 16, 16) and torch.equal(r.classes, preds.argmax(1))
    xb = torch.cat([b[0] for b in dls.valid])
    close(r.raw, cam_maps(learn.model, xb, 'layercam', layer='0.0'))
    assert n_hooks(learn.model) == 0 and no_grads(learn.model) and torch.is_grad_enabled()

@pytest.mark.parametrize('outer', ['cam', 'gradcam'])
def test_callbacks_on_nested_layers(dls, outer):
    "A CAM (or gradient) callback on the body and a Grad-CAM callback inside it: neither cuts the other's graph"
    set_seed(0)
    outer_cb = CAMCallback() if outer == 'cam' else GradCAMCallback(layer='0')
    inner_cb = GradCAMCallback(method='hirescam', layer='0.0')
    learn = Learner(dls, tiny_cnn(), cbs=[outer_cb, inner_cb])
    learn.predict(_img(dls))
    xb = learn.dls.test_dl([_img(dls)]).one_batch()[0]
    close(inner_cb.result.raw, cam_maps(learn.model, xb, 'hirescam', layer='0.0'))
    close(outer_cb.result.raw, cam_maps(learn.model, xb, outer, layer='0'))
    assert n_hooks(learn.model) == 0 and no_grads(learn.model) and torch.is_grad_enabled()

def test_gradcam_callback_under_inference_mode(dls):
    "fastai's predict cannot leave an outer inference mode: a clear error, and nothing left behind"
    learn = Learner(dls, tiny_cnn(), cbs=GradCAMCallback(layer='0.0'))
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match='inference_mode'): learn.predict(_img(dls))
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    assert n_hooks(learn.model) == 0 and torch.is_grad_enabled() and no_grads(learn.model)
    learn.predict(_img(dls))
    assert learn.gradcam_cb.result.raw.shape == (1, 16, 16)

def test_gradcam_callback_forward_raises(dls):
    class Boom(nn.Module):
        def __init__(self):
            super().__init__(); self.m = tiny_cnn(); self.boom = True
        def forward(self, x):
            a = self.m[0](x)
            if self.boom: raise RuntimeError('boom')
            return self.m[1](a)
    model = Boom()
    learn = Learner(dls, model, cbs=GradCAMCallback(layer='m.0'))
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            with pytest.raises(RuntimeError, match='boom'): learn.predict(_img(dls))
            assert torch.is_grad_enabled() == grad_mode, grad_mode
            assert n_hooks(model) == 0
            with pytest.raises(RuntimeError, match='boom'): learn.get_preds(dl=dls.valid)
            assert torch.is_grad_enabled() == grad_mode, grad_mode
            assert n_hooks(model) == 0
            with pytest.raises(RuntimeError, match='boom'): learn.cam(_img(dls), method='gradcam', layer='m.0')
            assert torch.is_grad_enabled() == grad_mode and n_hooks(model) == 0
    assert no_grads(model)
    model.boom = False
    learn.predict(_img(dls))
    assert learn.gradcam_cb.result.raw.shape == (1, 8, 8) and n_hooks(model) == 0

# ---------------------------------------------------------------- multi-label

def test_multilabel_cls_lists():
    set_seed(0)
    mdls = synth_image_dls(n=16, bs=8, multi=True)
    learn = Learner(mdls, tiny_cnn(), loss_func=BCEWithLogitsLossFlat())
    imgs = [_img(mdls, i) for i in range(3)]
    res = learn.cam(imgs, cls=[[0, 2], [1], [0, 1, 2]], method='gradcam', layer='0.0')
    assert res.raw.shape == (6, 16, 16)
    assert res.items.tolist() == [0, 0, 1, 2, 2, 2] and res.classes.tolist() == [0, 2, 1, 0, 1, 2]
    assert learner_vocab(learn) == ['b', 'g', 'r'] and res.labels == ['b', 'r', 'g', 'b', 'g', 'r']
    assert torch.equal(learn.cam(imgs, cls=[['b', 'r'], ['g'], ['b', 'g', 'r']], method='gradcam', layer='0.0').raw, res.raw)
    # each map is the map of that class alone, and the probabilities are the sigmoid of that label
    for c in range(3):
        one = learn.cam(imgs, cls=c, method='gradcam', layer='0.0')
        sel = res.classes == c
        close(res.raw[sel], one.raw[res.items[sel]], 1e-6)
        close(res.probs[sel], one.probs[res.items[sel]], 1e-6)
    assert ((res.probs > 0) & (res.probs < 1)).all()
    # None: every label predicted above the threshold, and at least one per item
    auto = learn.cam(imgs, method='gradcam', layer='0.0')
    keep = auto.preds > 0.5; keep[torch.arange(3), auto.preds.argmax(1)] = True
    assert len(auto.raw) == int(keep.sum()) and set(auto.items.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match='2 classes for 3 items'): learn.cam(imgs, cls=[[0], [1]], method='gradcam')
    assert n_hooks(learn.model) == 0 and no_grads(learn.model)
