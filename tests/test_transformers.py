"""Issue 10: the fastai glue on transformers and timm bodies (vision_learner with timm ViT, DeiT, ConvNeXt, EfficientNet:
the callbacks, learn.cam, show_cam, learn.cam(dl=), top losses, `fastai-cam explain` with an exported learner), and
every gradient method at the automatic layer of a hybrid ViT with registers equals the hand-written reshape + formula
(localisation on the trained model is asserted in nbs/20_transformers.ipynb, where it is trained once)."""
import csv, warnings
import pytest, torch, torch.nn as nn, numpy as np, matplotlib.pyplot as plt
from fastai.vision.all import vision_learner, PILImage, ClassificationInterpretation
from fastai_cam.all import *
from fastai_cam.explain import explain
from fastai_cam.data import digit_vit

pytestmark = pytest.mark.usefixtures('one_thread')
warnings.filterwarnings('ignore', category=UserWarning)
GRAD = ['gradcam', 'gradcam++', 'xgradcam', 'hirescam', 'layercam']

# ------------------------------------------------------------------------------------------ fastai glue
TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
BODIES = [  # arch, timm kwargs, the automatic layer, its grid for 32-px images, the methods of its CAMCallback
    ('vit_tiny_patch16_224', TINY_VIT, '0.model.blocks.1.norm1', (4, 4), ['gradcam', 'layercam', 'rollout', 'gradrollout']),
    ('deit_tiny_distilled_patch16_224', TINY_VIT, '0.model.blocks.1.norm1', (4, 4), ['gradcam', 'rollout']),
    ('convnext_atto', {}, '0', (1, 1), ['cam', 'gradcam']),
    ('efficientnet_b0', {}, '0', (1, 1), ['cam', 'gradcam']),
]

@pytest.fixture(scope='module')
def dls(): return synth_image_dls(n=16, size=32, bs=4)

def _img(seed): return PILImage.create(np.random.default_rng(seed).integers(0, 255, (32, 32, 3)).astype(np.uint8))

@pytest.mark.parametrize('arch,kw,layer,grid,methods', BODIES, ids=[b[0] for b in BODIES])
def test_vision_learner_bodies(dls, arch, kw, layer, grid, methods):
    learn = vision_learner(dls, arch, pretrained=False, **kw)
    xb = dls.test_dl([_img(0), _img(1)]).one_batch()[0]
    for m in methods:
        learn.add_cb(CAMCallback(method=m))
        learn.predict(_img(0))
        r = learn.cam_cb.result
        assert r.layer == (layer if m not in ('rollout', 'gradrollout') else '0.model.blocks') and r.raw.shape == (1,) + grid
        learn.remove_cb(learn.cam_cb)
        res = learn.cam([_img(0), _img(1)], method=m)                           # learn.cam: the maps of cam_maps on the model
        torch.testing.assert_close(res.raw, cam_maps(learn.model, xb, m), atol=1e-5, rtol=1e-4)
        assert res.maps.shape == (2, 32, 32) and n_hooks(learn.model) == 0
    learn.add_cb(GradCAMCallback())
    learn.predict(_img(1))
    assert learn.gradcam_cb.result.layer == layer
    learn.remove_cb(learn.gradcam_cb)
    assert all(p.grad is None for p in learn.model.parameters())
    meth = methods[0]
    res = learn.cam(dl=dls.valid, method=meth)
    assert res.raw.shape == (len(dls.valid_ds),) + grid
    axs = learn.show_cam(_img(0), method=meth)
    assert len(axs) == 1 and len(axs[0].images) == 2
    axs = ClassificationInterpretation.from_learner(learn).plot_top_losses_cam(2, method=meth)
    assert len(axs) == 2 and all(len(a.get_title().removesuffix(' (all zero)').split()) == 3 for a in axs)   # loss, actual/pred, prob
    plt.close('all')
    if arch.startswith('vit'):
        with pytest.raises(LayerError, match="method='rollout'"): learn.cam(_img(0), method='cam')   # a class token: no CAM

def test_explain_an_exported_vit(dls, tmp_path):
    "`fastai-cam explain` with an exported ViT learner: overlays and a CSV, Grad-CAM at the automatic layer and rollout"
    learn = vision_learner(dls, 'vit_tiny_patch16_224', pretrained=False, **TINY_VIT)
    learn.export(tmp_path/'vit.pkl')
    (tmp_path/'imgs').mkdir()
    for i in range(3): _img(i).save(tmp_path/'imgs'/f'{i}.png')
    for m,layer in (('gradcam', '0.model.blocks.1.norm1'), ('rollout', '0.model.blocks')):
        df = explain(tmp_path/'vit.pkl', [tmp_path/'imgs'], tmp_path/m, method=m, save_maps=True, progress=False)
        assert len(df) == 3 and set(df.method) == {m} and set(df.layer) == {layer} and (df.error.fillna('') == '').all()
        assert all((tmp_path/m/o).exists() for o in df.overlay)
        with np.load(tmp_path/m/'maps.npz') as z: assert all(z[k].shape == (4, 4) for k in z.files)

def test_reshape_by_hand_through_show_cam_and_the_cli(dls, tmp_path):
    "`reshape=` on show_cam and `fastai-cam explain --reshape NAME --import helpers.py` give the automatic maps"
    import argparse
    from fastai_cam.explain import add_explain_args, explain_main
    learn = vision_learner(dls, 'vit_tiny_patch16_224', pretrained=False, **TINY_VIT)
    grid = lambda t: t[:, 1:].transpose(1, 2).unflatten(2, (4, 4))                # a class token, 4x4 patches
    auto, hand = (learn.show_cam(_img(0), method='gradcam', reshape=r)[0].images[1].get_array() for r in (None, grid))
    np.testing.assert_allclose(hand, auto, atol=1e-5)
    learn.export(tmp_path/'vit.pkl')
    (tmp_path/'imgs').mkdir(); _img(0).save(tmp_path/'imgs'/'0.png')
    (tmp_path/'helpers.py').write_text("def vit_grid(t): return t[:, 1:].transpose(1, 2).unflatten(2, (4, 4))\n")
    run = lambda out, *extra: explain_main(add_explain_args(argparse.ArgumentParser()).parse_args(
        [str(tmp_path/'vit.pkl'), str(tmp_path/'imgs'), '-o', str(tmp_path/out), '--method', 'gradcam', '--save-maps', '-q', *extra]))
    assert run('auto') == 0 and run('hand', '--import', str(tmp_path/'helpers.py'), '--reshape', 'vit_grid') == 0
    with np.load(tmp_path/'auto'/'maps.npz') as a, np.load(tmp_path/'hand'/'maps.npz') as h:
        assert a.files == h.files and all(np.allclose(a[k], h[k], atol=1e-5) for k in a.files)
    assert run('bad', '--import', str(tmp_path/'helpers.py'), '--reshape', 'grd') == 2     # "No function 'grd' in ...: vit_grid"

def test_vit_target_and_several_classes(dls):
    "`target=` and several classes per item reach the attention methods through learn.cam"
    learn = vision_learner(dls, 'vit_tiny_patch16_224', pretrained=False, **TINY_VIT)
    res = learn.cam([_img(0)], method='gradrollout', cls=[['b', 'r']])
    assert res.labels == ['b', 'r'] and not torch.allclose(res.raw[0], res.raw[1])
    res = learn.cam([_img(0)], method='gradcam', target=lambda o: o[:, 0] - o[:, 1])
    xb = dls.test_dl([_img(0)]).one_batch()[0]
    torch.testing.assert_close(res.raw, cam_maps(learn.model, xb, 'gradcam', target=lambda o: o[:, 0] - o[:, 1]))

# ------------------------------------------------------------------------------------------ the formula at the auto layer
def test_vit_gradient_methods_equal_the_formula():
    """At the automatic layer of `digit_vit` (a class token and 4 registers), every gradient method = a hook +
    autograd.grad by hand, the tokens reshaped by hand, the formula. (Localisation on the trained model, rollout >= 0.9
    and LayerCAM >= 0.75, is asserted where it is trained once: nbs/20_transformers.ipynb.)"""
    torch.manual_seed(0)
    model = digit_vit().eval()
    x, y = torch.randn(6, 3, 48, 48), torch.tensor([0, 1, 2, 3, 4, 5])
    assert find_layer(model)[0] == 'blocks.2.norm1'                           # the last block's attention input
    kept = {}
    def hook(m, i, o):
        kept['a'] = a = o.detach().requires_grad_(); torch.set_grad_enabled(True); return a.clone()
    h = model.blocks[-1].norm1.register_forward_hook(hook)
    try:
        with torch.no_grad(): out = model(x)
    finally: h.remove()
    g, = torch.autograd.grad(out[torch.arange(6), y].sum(), kept['a'])
    grid = lambda t: t[:, 5:].transpose(1, 2).unflatten(2, (12, 12))           # a class token and 4 registers, 12x12 patches
    A, G = grid(kept['a'].detach()), grid(g)
    for m in GRAD:
        torch.testing.assert_close(cam_maps(model, x, m, cls=y), METHODS[m].fn(A, G), atol=1e-5, rtol=1e-4, msg=m)
    assert n_hooks(model) == 0 and all(p.grad is None for p in model.parameters())
