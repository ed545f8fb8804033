"""Our maps agree with the peers' (pytorch-grad-cam, torchcam, captum) on a small random resnet18.

Every map is compared the same way: bilinear (`align_corners=False`) to the input size, then per-map min-max. Where a
peer computes something else on purpose or by mistake, the test asserts the exact relation instead (and says why).
The peers are optional (`pip install -e .[bench]`): each test skips when its peer is missing.
`benchmarks/peers.py` prints the same comparisons on resnet18 and resnet50 at more layers."""
import functools
import pytest
import torch

from fastai_cam.core import cam_maps, compute_cams
import fastai_cam.methods as fm
from fastai_cam.methods import minmax, upsample

TOL = 1e-4

@pytest.fixture(scope='module')
def setup():
    torchvision = pytest.importorskip('torchvision')
    # tiny inputs: on a busy 2-core machine, torch's OpenMP threads mostly wait for each other (6x slower here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): cls = model(x).argmax(1).tolist()
    yield model, x, cls
    torch.set_num_threads(threads)

def up(maps, x): return minmax(upsample(maps.detach().float(), x.shape[-2:]))

def ours(model, x, method, layer, cls):
    m = up(cam_maps(model, x, method=method, layer=layer, cls=cls), x)
    assert m.flatten(1).std(1).min() > 0, "a constant map would make the comparison vacuous"
    return m

def maxdiff(a, b): return (a.float() - torch.as_tensor(b).float()).abs().max().item()

def torchcam_maps(model, x, method_cls, layer, cls, needs_grad=True, **kw):
    with method_cls(model, layer, input_shape=tuple(x.shape[1:]), **kw) as ext:
        if needs_grad: scores = model(x)
        else:
            with torch.no_grad(): scores = model(x)
        return up(ext(class_idx=list(cls), scores=scores)[0], x)

def pgc_maps(model, x, method_cls, layer, cls):
    import contextlib, io
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    with contextlib.redirect_stderr(io.StringIO()), method_cls(model=model, target_layers=[dict(model.named_modules())[layer]]) as c:
        return torch.from_numpy(c(input_tensor=x, targets=[ClassifierOutputTarget(k) for k in cls]))

def test_cam_vs_torchcam(setup):
    "CAM: both are `W_c . a_ij` without ReLU (ours is `head_c(a) - head_c(0)`, the same for GAP -> Linear)"
    tm = pytest.importorskip('torchcam.methods')
    model, x, cls = setup
    theirs = torchcam_maps(model, x, tm.CAM, 'layer4', cls, needs_grad=False, fc_layer='fc')
    assert maxdiff(ours(model, x, 'cam', 'layer4', cls), theirs) <= TOL

@pytest.mark.parametrize('layer', ['layer4', 'layer2'])
def test_gradcam_vs_captum(setup, layer):
    captum_attr = pytest.importorskip('captum.attr')
    model, x, cls = setup
    a = captum_attr.LayerGradCam(model, dict(model.named_modules())[layer]).attribute(x, target=cls, relu_attributions=True)
    assert maxdiff(ours(model, x, 'gradcam', layer, cls), up(a[:, 0], x)) <= TOL

def test_gradcam_inplace_layer_vs_captum(setup):
    "bn2's output is overwritten by the block's `out += identity` and in-place ReLU: captum clones it, as we do"
    captum_attr = pytest.importorskip('captum.attr')
    model, x, cls = setup
    layer = 'layer4.1.bn2'
    a = captum_attr.LayerGradCam(model, model.layer4[1].bn2).attribute(x, target=cls, relu_attributions=True)
    assert maxdiff(ours(model, x, 'gradcam', layer, cls), up(a[:, 0], x)) <= TOL

def test_gradcampp_vs_pytorch_grad_cam(setup, monkeypatch):
    "Same Grad-CAM++ formula; its eps is 1e-6 (ours 1e-7), which dominates alpha when G^2 is small, as it is here"
    pgc = pytest.importorskip('pytorch_grad_cam')
    model, x, cls = setup
    theirs = pgc_maps(model, x, pgc.GradCAMPlusPlus, 'layer4', cls)
    a = ours(model, x, 'gradcam++', 'layer4', cls)
    assert torch.corrcoef(torch.stack([a.flatten(), theirs.flatten()]))[0, 1] > 0.99
    monkeypatch.setitem(fm.METHODS, 'gradcam++', fm.Method('gradcam++', functools.partial(fm.gradcam_pp, eps=1e-6), True))
    assert maxdiff(ours(model, x, 'gradcam++', 'layer4', cls), theirs) <= TOL

def test_torchcam_gradcampp_is_relu_g_cubed(setup, monkeypatch):
    "torchcam's GradCAMpp divides a copy (`alpha[idx][mask].div_(...)` on a boolean-indexed copy): w = sum relu(G)^3"
    tm = pytest.importorskip('torchcam.methods')
    model, x, cls = setup
    theirs = torchcam_maps(model, x, tm.GradCAMpp, 'layer2', cls)
    cubed = lambda A, G: fm.weighted_sum(A, (G.float().relu() ** 3).sum((2, 3)))
    monkeypatch.setitem(fm.METHODS, 'gradcam++', fm.Method('gradcam++', cubed, True))
    assert maxdiff(ours(model, x, 'gradcam++', 'layer2', cls), theirs) <= TOL

def test_xgradcam_vs_torchcam(setup):
    tm = pytest.importorskip('torchcam.methods')
    model, x, cls = setup
    assert maxdiff(ours(model, x, 'xgradcam', 'layer2', cls), torchcam_maps(model, x, tm.XGradCAM, 'layer2', cls)) <= TOL

def test_hirescam_vs_pytorch_grad_cam(setup):
    pgc = pytest.importorskip('pytorch_grad_cam')
    model, x, cls = setup
    assert maxdiff(ours(model, x, 'hirescam', 'layer2', cls), pgc_maps(model, x, pgc.HiResCAM, 'layer2', cls)) <= TOL

def test_layercam_vs_torchcam(setup):
    tm = pytest.importorskip('torchcam.methods')
    model, x, cls = setup
    assert maxdiff(ours(model, x, 'layercam', 'layer2', cls), torchcam_maps(model, x, tm.LayerCAM, 'layer2', cls)) <= TOL

class _UpsampleAlignFalse(torch.nn.Module):
    def __init__(self, size): super().__init__(); self.size = size
    def forward(self, x): return torch.nn.functional.interpolate(x, self.size, mode='bilinear', align_corners=False)

def test_scorecam_vs_pytorch_grad_cam(setup, monkeypatch):
    """pytorch-grad-cam upsamples the masks with `nn.UpsamplingBilinear2d`, which is `align_corners=True`: with
    `align_corners=False` (ours, and `F.interpolate`'s default) the masks, weights and maps are the same"""
    pgc = pytest.importorskip('pytorch_grad_cam')
    model, x, cls = setup
    theirs_default = pgc_maps(model, x, pgc.ScoreCAM, 'layer2', cls)
    monkeypatch.setattr(torch.nn, 'UpsamplingBilinear2d', _UpsampleAlignFalse)
    theirs = pgc_maps(model, x, pgc.ScoreCAM, 'layer2', cls)
    a = ours(model, x, 'scorecam', 'layer2', cls)
    assert maxdiff(a, theirs) <= TOL
    assert maxdiff(a, theirs_default) > 10*TOL          # the difference is the interpolation, nothing else

def test_eigencam_vs_pytorch_grad_cam(setup):
    "pytorch-grad-cam keeps the SVD's arbitrary sign; ours takes the sign that correlates with the mean map"
    pgc = pytest.importorskip('pytorch_grad_cam')
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
    model, x, cls = setup
    for layer in ['layer4', 'layer2']:
        a = ours(model, x, 'eigencam', layer, cls)
        A = compute_cams(model, x, 'eigencam', layer, keep_acts=True).acts
        proj = torch.from_numpy(get_2d_projection(A.numpy()))                    # its projection, before ReLU
        theirs = pgc_maps(model, x, pgc.EigenCAM, layer, cls)
        assert maxdiff(theirs, up(proj.relu(), x)) <= TOL                       # what it computes
        for i in range(len(x)):                                                   # ours: one of the two signs...
            d = [maxdiff(a[i], up((s * proj[i:i+1]).relu(), x)[0]) for s in (1, -1)]
            assert min(d) <= TOL
            mean = A[i].mean(0).flatten()                                         # ...the one agreeing with the mean
            s = 1 if d[0] <= d[1] else -1
            assert torch.corrcoef(torch.stack([(s * proj[i]).flatten(), mean]))[0, 1] >= 0

def test_seg_gradcam_vs_pytorch_grad_cam(setup):
    """Seg-Grad-CAM: a `RegionTarget` over the pixels predicted as a class, and pytorch-grad-cam's
    `SemanticSegmentationTarget` given that mask, on a fastai U-Net at its automatic layer (the last decoder block)"""
    pgc = pytest.importorskip('pytorch_grad_cam')
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
    from fastai.vision.all import create_unet_model, resnet18
    from fastai_cam.core import find_layer
    from fastai_cam.targets import RegionTarget
    torch.manual_seed(0)
    m = create_unet_model(resnet18, 3, (64, 64), pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): pred = m(x).argmax(1)
    c = int(pred.flatten().mode().values)
    a = up(cam_maps(m, x, 'gradcam', target=RegionTarget(c)), x)
    assert a.flatten(1).std(1).min() > 0
    targets = [SemanticSegmentationTarget(c, (p == c).float().numpy()) for p in pred]
    with pgc.GradCAM(model=m, target_layers=[find_layer(m)[1]]) as cam:
        theirs = torch.from_numpy(cam(input_tensor=x, targets=targets))
    assert maxdiff(a, theirs) <= 1e-5
