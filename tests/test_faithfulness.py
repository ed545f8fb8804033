"Faithfulness metrics and sanity checks on a trained demo model; `fastai-cam evaluate` with two processes"
import copy, os, subprocess, sys
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from fastai_cam.callback import GradCAMCallback
from fastai_cam.core import n_hooks
from fastai_cam.data import demo_learner
from fastai_cam.faithfulness import (FAITHFULNESS_METRICS, baseline_maps, faithfulness, evaluate_run, sanity_check,
                                     _cli)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore',
       'PYTHONPATH': os.pathsep.join([str(ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])}
N = 32

@pytest.fixture(scope='module')
def learn(one_thread):
    "The demo model, trained small (about 95% held-out accuracy in seconds), with a Grad-CAM callback attached"
    l = demo_learner(n_train=2000, n_valid=N, epochs=4, size=40, digit_size=(13, 20), noise=0, progress=False,
                     cbs=GradCAMCallback())
    with l.no_bar(): assert l.validate()[1] > 0.85
    return l

def valid(learn):
    x, y = next(iter(learn.dls.valid.new(bs=N)))
    return x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)

def box_maps(boxes, H, W):
    "1 inside the digit's box, 0 outside"
    ys, xs = torch.arange(H)[None, :, None] + 0.5, torch.arange(W)[None, None, :] + 0.5
    b = boxes.float()[:, :, None, None]
    return ((xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])).float()

def test_oracle_beats_random_and_inverted(learn):
    "The digit's box as a map: better than a random and than an inverted map on deletion, insertion and ROAD"
    x, y = valid(learn)
    oracle = box_maps(learn.dls.boxes[:N], *x.shape[-2:])
    ms = ['deletion', 'insertion', 'road_morf', 'road_lerf']
    score = lambda maps: {k: v.score.mean().item() for k, v in
                          faithfulness(learn.model, x, maps, y, ms, steps=8, percentiles=(25, 50, 75), bs=128).items()}
    o, r, i = score(oracle), score(baseline_maps('random', N, (10, 10))), score(1 - oracle)
    for worse in (r, i):
        assert o['deletion'] < worse['deletion'] and o['road_morf'] < worse['road_morf'], (o, worse)
        assert o['insertion'] > worse['insertion'] and o['road_lerf'] > worse['road_lerf'], (o, worse)

def grads_and_state(learn):
    return ([None if p.grad is None else p.grad.clone() for p in learn.model.parameters()],
            copy.deepcopy(learn.model.state_dict()), [m.training for m in learn.model.modules()], n_hooks(learn.model))

def assert_unchanged(learn, before):
    grads, state, modes, hooks = before
    after = grads_and_state(learn)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, after[0]))
    assert all(torch.equal(v, after[1][k]) for k, v in state.items())
    assert modes == after[2] and hooks == after[3] == 0

def test_report_cam_beats_random_learner_unchanged(learn):
    p = next(learn.model.parameters()); p.grad = torch.ones_like(p)          # a gradient that must stay as it is
    learn.model[0][2].train()                                               # a mixed mode that must come back
    before = grads_and_state(learn)
    rep = learn.cam_report(methods=['cam', 'gradcam'], boxes=learn.dls.boxes, steps=8, percentiles=(25, 50, 75),
                           bs=128, progress=False)
    assert_unchanged(learn, before)
    assert list(rep.index) == ['cam', 'gradcam', 'random', 'centre']
    assert list(rep.columns) == list(FAITHFULNESS_METRICS) + ['pointing']
    c, r = rep.loc['cam'], rep.loc['random']
    assert c.deletion < r.deletion and c.insertion > r.insertion, rep
    assert c.road_morf < r.road_morf and c.road_lerf > r.road_lerf, rep
    assert c.pointing > 0.8 > r.pointing, rep
    san = learn.cam_sanity(list(learn.dls.valid_imgs[:8]), method='gradcam')
    assert_unchanged(learn, before)
    assert learn.gradcam_cb._hook is None
    learn.model[0][2].eval(); p.grad = None

@pytest.mark.parametrize('method', ['cam', 'gradcam'])
def test_randomised_model_maps_differ(learn, method):
    "Cascading randomisation down to the first layer: rank correlation with the original maps below 0.5"
    x, _ = valid(learn)
    rep = sanity_check(learn.model, x[:16], method)
    assert rep.spearman.iloc[-1] < 0.5, rep
    assert rep.layer.iloc[-1] == '0.0.0' and rep.layer.iloc[0] == '1.2'

def test_two_processes_same_as_one(learn, tmp_path):
    "torchrun with 2 processes (gloo, CPU): the same table as one process"
    learn.export(tmp_path/'model.pkl')
    (tmp_path/'imgs').mkdir()
    for i, img in enumerate(learn.dls.valid_imgs[:10]): Image.fromarray(img).save(tmp_path/'imgs'/f'{i:02d}.png')
    (tmp_path/'imgs'/'broken.png').write_bytes(b'no image')
    args = ['--methods', 'cam', 'gradcam', '--steps', '5', '--percentiles', '30', '70', '--bs', '4', '-q']
    try: _cli([str(tmp_path/'model.pkl'), str(tmp_path/'imgs'), '--out', str(tmp_path/'one')] + args)
    except SystemExit as e: assert e.code == 0
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
                        '-m', 'fastai_cam.faithfulness', tmp_path/'model.pkl', tmp_path/'imgs', '--out', tmp_path/'two'] + args,
                       capture_output=True, text=True, env=ENV, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(os.listdir(tmp_path/'two')) == ['curves.png', 'report.csv', 'report.md']
    one, two = (pd.read_csv(tmp_path/d/'report.csv', index_col=0) for d in ('one', 'two'))
    assert list(one.index) == list(two.index) == ['cam', 'gradcam', 'random', 'centre']
    np.testing.assert_allclose(one.to_numpy(), two.to_numpy(), atol=1e-5)
    assert (tmp_path/'one'/'report.md').read_text().endswith('10 images.\n')
