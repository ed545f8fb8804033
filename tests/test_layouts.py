"""Issue 10: every feature-map layout read automatically. On each family (timm ViT at 224 and 288 px, non-square,
DeiT distilled, DINOv2 with registers, timm and torchvision Swin, timm ConvNeXt and MaxViT channels-last blocks,
torchvision's ViT), every method's maps equal a forward hook + `torch.autograd.grad` written by hand, the layer's
output reshaped by hand to (B,K,*grid), then the same formula; the grid and the prefix tokens are inferred; 1-D and
3-D CAM is Zhou's `w_c . a`; and the errors say what to do. Small random models: the file runs in seconds."""
import pytest, torch, torch.nn as nn, timm, torchvision
from fastai_cam.all import *
from fastai_cam.layouts import CHANNELS_LAST

pytestmark = pytest.mark.usefixtures('one_thread')

def tokens(P, grid): return lambda t: t[:, P:].transpose(1, 2).unflatten(2, grid)
def nhwc(t): return t.permute(0, 3, 1, 2)
def nchw(t): return t

def by_hand(model, x, layer, reshape, method, cls, head_w=None):
    """The maps of `method` at `layer`, written out: a forward hook that keeps the layer's output as a leaf (the forward
    before it runs under `no_grad`, as any fast implementation does: a module such as `nn.MultiheadAttention` takes
    another kernel with autograd on, and methods that divide by sums near zero, XGrad-CAM on a LayerNorm's output,
    or whose first principal direction is barely separated, Eigen-CAM, would turn that 1e-7 into differences),
    `torch.autograd.grad` of the class scores, the output reshaped by hand to (B,K,*grid), then the formula"""
    model.eval()
    kept = {}
    def hook(m, i, o):
        kept['a'] = a = o.detach().requires_grad_()
        torch.set_grad_enabled(True)                              # inside `no_grad`: autograd from the layer on
        return a.clone()
    h = model.get_submodule(layer).register_forward_hook(hook)
    try:
        with torch.no_grad(): out = model(x)
    finally: h.remove()
    a = kept['a']
    A = reshape(a.detach())
    idx = torch.arange(len(x))
    if method == 'cam': return torch.einsum('nk,nk...->n...', head_w[cls], A)
    if method == 'eigencam': return eigencam(A)
    if method == 'scorecam':
        masks = scorecam_masks(A, x.shape[2:])                                   # (B,K,*size)
        with torch.no_grad():
            s = torch.stack([torch.cat([model(x[i:i+1] * masks[i, k:k+64, None])[:, cls[i]] for k in range(0, A.shape[1], 64)])
                             for i in range(len(x))])
        return scorecam(A, s)
    g, = torch.autograd.grad(out[idx, cls].sum(), a)
    return METHODS[method].fn(A, reshape(g))

GRAD = ['gradcam', 'gradcam++', 'xgradcam', 'hirescam', 'layercam']

def small_vit(name, **kw): return timm.create_model(name, pretrained=False, depth=2, num_classes=5, **kw).eval()
def small_tv_swin(): return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[1, 1], num_heads=[1, 2],
                                                              window_size=[7, 7], num_classes=5).eval()

def families():
    "(id, model, input, layer or None for the automatic one, the reshape a user would write, expected layout, methods)"
    torch.manual_seed(0)
    vit = small_vit('vit_tiny_patch16_224', embed_dim=48, num_heads=3)
    dyn = small_vit('vit_tiny_patch16_224', embed_dim=48, num_heads=3, dynamic_img_size=True)
    deit = small_vit('deit_tiny_distilled_patch16_224', embed_dim=48, num_heads=3, img_size=(64, 96))
    reg = small_vit('vit_small_patch14_reg4_dinov2', embed_dim=48, num_heads=3, img_size=70)
    sw = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, embed_dim=24, depths=(1, 1), num_heads=(1, 2),
                           img_size=56, num_classes=5).eval()
    tsw = small_tv_swin()
    cn = timm.create_model('convnext_atto', pretrained=False, conv_mlp=False, num_classes=5).eval()
    mx = timm.create_model('maxvit_pico_rw_256', pretrained=False, img_size=64, num_classes=5).eval()
    tvb = torchvision.models.vit_b_16(image_size=64, num_classes=5).eval()
    tvs = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                                               mlp_dim=64, num_classes=5).eval()
    for m in (tvb, tvs): nn.init.normal_(m.heads.head.weight)      # torchvision zeroes its head: no gradient at all
    x = lambda *s: torch.randn(2, 3, *s)
    # Score-CAM (K masked forwards per item) on some families only: for time, and because a random ConvNeXt (zero biases,
    # LayerNorms of near-zero vectors) turns the 1e-7 rounding of two ways of upsampling a mask into 1e-2 in its logits
    ALL, NO_SC = GRAD + ['eigencam', 'scorecam'], GRAD + ['eigencam']
    return [
        ('vit-224', vit, x(224, 224), 'blocks.1.norm1', tokens(1, (14, 14)), Layout('tokens', (14, 14), 1), ALL),
        ('vit-288-dynamic', dyn, x(288, 288), 'blocks.1.norm1', tokens(1, (18, 18)), Layout('tokens', (18, 18), 1), NO_SC),
        ('vit-288x224-dynamic', dyn, x(288, 224), 'blocks.1.norm1', tokens(1, (18, 14)), Layout('tokens', (18, 14), 1), ALL),
        ('deit-distilled', deit, x(64, 96), 'blocks.1.norm1', tokens(2, (4, 6)), Layout('tokens', (4, 6), 2), ALL),
        ('dinov2-reg4', reg, x(70, 70), 'blocks.1.norm1', tokens(5, (5, 5)), Layout('tokens', (5, 5), 5), ALL),
        ('timm-swin-stage', sw, x(56, 56), 'layers.1', nhwc, Layout('NHWC', (7, 7)), ALL),
        ('timm-swin-auto', sw, x(56, 56), 'norm', nhwc, Layout('NHWC', (7, 7)), ALL + ['cam']),
        ('tv-swin-stage', tsw, x(56, 56), 'features.3', nhwc, Layout('NHWC', (7, 7)), ALL),
        ('tv-swin-norm', tsw, x(56, 56), 'norm', nhwc, Layout('NHWC', (7, 7)), NO_SC),
        ('tv-swin-auto', tsw, x(56, 56), 'permute', nchw, Layout('NCHW', (7, 7)), NO_SC + ['cam']),
        ('convnext-stage', cn, x(64, 64), 'stages.2', nchw, Layout('NCHW', (4, 4)), NO_SC),
        ('convnext-channels-last-mlp', cn, x(64, 64), 'stages.3.blocks.1.mlp', nhwc, Layout('NHWC', (2, 2)), NO_SC),
        ('convnext-channels-last-norm', cn, x(64, 64), 'stages.2.blocks.1.norm', nhwc, Layout('NHWC', (4, 4)), NO_SC),
        ('maxvit-partition-attention', mx, x(64, 64), 'stages.1.blocks.0.attn_grid', nhwc, Layout('NHWC', (8, 8)), NO_SC),
        ('tv-vit_b_16', tvb, x(64, 64), 'encoder.layers.encoder_layer_11.ln_1', tokens(1, (4, 4)), Layout('tokens', (4, 4), 1), NO_SC),
        ('tv-vit-small', tvs, x(64, 64), 'encoder.layers.encoder_layer_1.ln_1', tokens(1, (4, 4)), Layout('tokens', (4, 4), 1), ALL),
    ]

FAMILIES = families()

@pytest.mark.parametrize('fid,model,x,layer,reshape,layout,methods', FAMILIES, ids=[f[0] for f in FAMILIES])
def test_maps_equal_hand_written_reshape(fid, model, x, layer, reshape, layout, methods):
    cls = torch.tensor([1, 3])
    o = compute_cams(model, x, 'gradcam', layer=layer, cls=cls)
    assert o.layout == layout, (fid, o.layout)
    head_w = None
    if 'cam' in methods:                        # the automatic layer, whose head is GAP -> Linear
        assert find_layer(model)[0] == layer
        head_w = model.head.fc.weight if hasattr(model.head, 'fc') else model.head.weight
    for m in methods:
        ours = cam_maps(model, x, m, layer=None if m == 'cam' else layer, cls=cls)
        ref = by_hand(model, x, layer, reshape, m, cls, head_w)
        assert ours.shape == (2,) + layout.grid
        torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-4, msg=f'{fid} {m}')
        if m == 'gradcam': assert ref.abs().sum() > 0, f'{fid}: an all-zero map tests nothing'

def test_automatic_layers():
    "class token: the last block's attention input; average pooling: what the mean reads; Swin: the pooling rule"
    byid = {f[0]: f for f in FAMILIES}
    for fid in ('vit-224', 'deit-distilled', 'dinov2-reg4', 'tv-vit_b_16', 'timm-swin-auto', 'tv-swin-auto'):
        _, model, _, layer, *_ = byid[fid]
        assert find_layer(model)[0] == layer, fid

def test_grid_and_prefix_inference():
    vit = FAMILIES[0][1]
    assert token_grid(vit, 197, (224, 224)) == (1, (14, 14))
    dyn = FAMILIES[1][1]
    assert token_grid(dyn, 1 + 18*14, (288, 224)) == (1, (18, 14))
    assert token_grid(dyn, 1 + 14*18, (224, 288)) == (1, (14, 18))
    assert token_grid(FAMILIES[3][1], 2 + 24, (64, 96)) == (2, (4, 6))        # DeiT: class + distillation tokens
    assert token_grid(FAMILIES[4][1], 5 + 25, (70, 70)) == (5, (5, 5))        # DINOv2: class + 4 registers
    assert token_grid(FAMILIES[-2][1], 17, (64, 64)) == (1, (4, 4))           # torchvision: one class token
    # no model: the shape alone, when one patch size gives the only grid (at most 16 prefix tokens)
    assert token_grid(None, 5 + 14*14, (224, 224)) == (5, (14, 14))
    assert token_grid(None, 1 + 14*14, (224, 224)) == (1, (14, 14))           # 15 + 13x14 needs unequal strides
    assert token_grid(None, 4 + 6*8, (96, 128)) == (4, (6, 8))
    assert token_grid(None, 1 + 4*4, (70, 70)) is None                        # 16-px patches floored, or 13 + 2x2 of 35 px
    assert token_grid(None, 64, (224, 224)) is None                           # 8x8 of 28 px, or 15 + 7x7 of 32 px

def test_1d_3d_cam_is_zhou():
    "CAM at the layer feeding a 1-D or 3-D GAP -> Linear head is `w_c . a` at each position, exactly"
    torch.manual_seed(0)
    for conv, pool, x in ((nn.Conv1d, nn.AdaptiveAvgPool1d, torch.randn(3, 2, 50)),
                          (nn.Conv3d, nn.AdaptiveAvgPool3d, torch.randn(3, 2, 4, 12, 12))):
        net = nn.Sequential(nn.Sequential(conv(2, 6, 3, padding=1), nn.ReLU(), conv(6, 8, 3, stride=2, padding=1)),
                            nn.Sequential(pool(1), nn.Flatten(), nn.Linear(8, 4))).eval()
        cls = torch.tensor([0, 3, 2])
        with torch.no_grad(): a = net[0](x)
        W, b = net[1][2].weight, net[1][2].bias
        c = cam_maps(net, x, cls=cls)
        torch.testing.assert_close(c, torch.einsum('nk,nk...->n...', W[cls], a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c.flatten(1).mean(1) + b[cls], net(x)[torch.arange(3), cls].detach(), atol=1e-5, rtol=1e-5)
        for m in GRAD + ['eigencam']:                                          # every method, the 1-D/3-D grid
            assert cam_maps(net, x, m, layer='0', cls=cls).shape == (3,) + a.shape[2:]

def test_ambiguous_shape_is_an_error():
    "(B,7,7,7) in a model with channels-last blocks: never read as NCHW; the error names the shape and `reshape=`"
    sw = FAMILIES[5][1]
    with pytest.raises(LayerOutputError, match=r"\(2, 7, 7, 7\) is laid out.*`reshape=`"):
        read_layout(torch.randn(2, 7, 7, 7), nn.GELU(), sw, torch.randn(2, 3, 224, 224), name='x')
    class Seven(nn.Module):                                  # Swin stages, then a layer that says nothing of its channels
        def __init__(s): super().__init__(); s.pe, s.stages, s.proj, s.act, s.fc = sw.patch_embed, sw.layers, nn.Linear(48, 7), nn.GELU(), nn.Linear(7, 5)
        def forward(s, x): return s.fc(s.act(s.proj(s.stages(s.pe(x)))).mean((1, 2)))
    with pytest.raises(LayerOutputError, match=r"outputs? .*\(2, 7, 7, 7\).*reshape="):
        cam_maps(Seven(), torch.randn(2, 3, 56, 56), 'gradcam', layer='act')
    # ... and with `reshape=` it works, as the hand-written formula
    m = cam_maps(Seven(), torch.randn(2, 3, 56, 56), 'gradcam', layer='act', reshape=nhwc)
    assert m.shape == (2, 7, 7)
    assert 'SwinTransformerBlock' in CHANNELS_LAST

def test_cam_on_a_class_token_model_points_to_gradients_and_rollout():
    vit, x = FAMILIES[0][1], FAMILIES[0][2]
    with pytest.raises(LayerError) as e: cam_maps(vit, x[:1])
    assert "method='gradcam'" in str(e.value) and "method='rollout'" in str(e.value)
    with pytest.raises(LayerError, match='fc_norm=False'):
        cam_maps(small_vit('vit_tiny_patch16_224', embed_dim=48, num_heads=3, img_size=32, patch_size=8, global_pool='avg',
                           class_token=False), torch.randn(1, 3, 32, 32))
