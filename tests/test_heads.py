"CAM is exact on every head fastai builds: default (concat pool, BN, dropout, Linear-ReLU-Linear), custom, y_range, multi-label"
import pytest, torch, torch.nn as nn
from fastai.vision.all import create_vision_model, create_head, resnet18, xresnet18, xresnet34, vision_learner, MSELossFlat
from fastai_cam.core import cam_maps, compute_cams, split_head, cam_from_head, run_head, eval_mode
from fastai_cam.callback import synth_image_dls, n_hooks
import fastai_cam.learner  # noqa: F401  (patches Learner.cam)

def location_logits(head, A, cls):
    "Reference: the model's head on a map where location (i,j)'s vector fills every position, minus the all-zero map"
    B,K,h,w = A.shape
    out = torch.empty(B, h, w)
    with torch.no_grad(), eval_mode(nn.ModuleList(head)):
        z = run_head(head, torch.zeros(1, K, h, w))[0, cls]
        for i in range(h):
            for j in range(w):
                filled = A[:, :, i:i+1, j:j+1].expand(B, K, h, w)
                out[:, i, j] = run_head(head, filled)[torch.arange(B), cls] - z
    return out

@pytest.mark.parametrize('arch', [resnet18, xresnet18, xresnet34])
def test_fastai_default_head_is_exact(arch):
    torch.manual_seed(0)
    m = create_vision_model(arch, 4, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    out = compute_cams(m, x, cls=[1, 3], keep_acts=True)
    split = split_head(m)
    assert split.layer is m[0]
    ref = location_logits(split.head, out.acts, torch.tensor([1, 3]))
    torch.testing.assert_close(out.maps, ref, rtol=1e-4, atol=1e-4)
    assert n_hooks(m) == 0

def test_custom_head_and_y_range():
    torch.manual_seed(0)
    custom = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 32), nn.Tanh(), nn.Linear(32, 3))
    m = create_vision_model(resnet18, 3, pretrained=False, custom_head=custom).eval()
    x = torch.randn(2, 3, 64, 64)
    out = compute_cams(m, x, cls=2, keep_acts=True)
    torch.testing.assert_close(out.maps, location_logits(list(m[1]), out.acts, torch.tensor([2, 2])), rtol=1e-4, atol=1e-4)
    # y_range: the head ends with SigmoidRange, CAM is still head_c(a_ij) - head_c(0)
    m = create_vision_model(resnet18, 1, pretrained=False, y_range=(0, 5)).eval()
    out = compute_cams(m, x, cls=0, keep_acts=True)
    torch.testing.assert_close(out.maps, location_logits(list(m[1]), out.acts, torch.tensor([0, 0])), rtol=1e-4, atol=1e-4)
    assert out.maps.isfinite().all()

def test_y_range_learner_and_multilabel_learner():
    dls = synth_image_dls()
    reg = vision_learner(dls, resnet18, pretrained=False, n_out=1, y_range=(0, 1), loss_func=MSELossFlat())
    x = dls.one_batch()[0][:2]
    assert cam_maps(reg.model, x, cls=0).shape == (2, 1, 1)
    mdls = synth_image_dls(multi=True)
    ml = vision_learner(mdls, resnet18, pretrained=False)
    res = ml.cam([mdls.valid_ds[0][0], mdls.valid_ds[1][0]], cls=[['r', 'b'], ['g']])
    assert res.items.tolist() == [0, 0, 1] and res.labels == ['r', 'b', 'g']

def test_wrong_head_is_detected():
    "A model whose forward is not head(layer(x)) gets a clear error instead of a wrong CAM"
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 2)
        def forward(self, x): return self.fc(self.pool(self.body(x)).flatten(1)) * 2 + 1
    with pytest.raises(ValueError, match="gradcam"): cam_maps(Odd(), torch.randn(1, 3, 8, 8))
    assert cam_maps(Odd(), torch.randn(1, 3, 8, 8), method='gradcam').shape == (1, 6, 6)
