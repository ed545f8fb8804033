"A model of two inputs (an image and a vector per item) through fastai: every method, Score-CAM's masked passes included, gives the maps of `cam_maps` on the same batch"
import pytest, torch, torch.nn as nn
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai_cam.core import cam_maps, n_hooks
from fastai_cam.callback import CAMCallback


class TwoInputs(nn.Module):
    "An image and a vector per item: the vector changes the logits, so each masked image needs its own item's vector"
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6 + 2, 3)
    def forward(self, x, meta): return self.fc(torch.cat([self.body(x).mean((2, 3)), meta], 1))


@pytest.fixture(scope='module')
def learn():
    torch.manual_seed(0)
    x, meta, y = torch.randn(10, 3, 12, 12), torch.randn(10, 2) * 3, torch.randint(0, 3, (10,))
    ds = list(zip(x, meta, y))
    dls = DataLoaders.from_dsets(ds, ds, bs=4, n_inp=2, device='cpu')
    return Learner(dls, TwoInputs(), loss_func=CrossEntropyLossFlat())


@pytest.mark.parametrize('method', ['gradcam', 'scorecam', 'eigencam'])
def test_callback_on_two_inputs(learn, method, one_thread):
    dl = learn.dls.valid.new(shuffle=False, drop_last=False)
    cb = CAMCallback(method=method, layer='body.0', gather_inputs=True)
    learn.get_preds(dl=dl, cbs=cb)
    xb = torch.stack([t[0] for t in dl.dataset]), torch.stack([t[1] for t in dl.dataset])
    ref = cam_maps(learn.model, xb, method=method, layer='body.0')
    torch.testing.assert_close(cb.result.raw, ref, atol=1e-5, rtol=1e-4)
    assert n_hooks(learn.model) == 0
