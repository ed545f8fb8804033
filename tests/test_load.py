"""Exported learners that need the user's code (issue 16), through the real `fastai-cam explain`: each failure is made
here (a helper module moved away, a notebook's `__main__` function, weights, a truncated copy, a fastai < 2.8
reference, a missing file) and gives its message and exit status 2; `--import` makes the same command succeed with
the outputs of an in-process `learn.cam`, and so does a learner exported on a GPU.

Two interpreters start: one exports the learners (its `__main__` is the "notebook"), one runs every command, each in
a process of its own forked from it after `fastai_cam.cli` is imported (a fresh `fastai-cam` process, without
paying the imports twelve times)."""
import csv, json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from fastai.data.transforms import get_image_files
from fastai.torch_core import default_device
from fastai_cam.load import load_cam_learner, pickle_needs
import fastai_cam.learner   # `Learner.cam`

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore',
       'PYTHONPATH': os.pathsep.join([str(ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])}

# the user's code: a label function and a model class
CODE = '''
from pathlib import Path
from torch import nn
from fastai.layers import ConvLayer, Flatten

def label(p): return Path(p).name.split('_')[0]

class TinyNet(nn.Sequential):
    def __init__(self, n_out=3):
        super().__init__(ConvLayer(3, 8, stride=2), ConvLayer(8, 16, stride=2), nn.AdaptiveAvgPool2d(1), Flatten(),
                         nn.Linear(16, n_out))
'''

# the "notebook": the same code imported from a helper module, and defined in its own `__main__`
MAKE = '''
import sys, pickle, torch
from unittest import mock
import fastcore.dispatch
from fastai.vision.all import *
torch.set_num_threads(1)
d = Path(sys.argv[1])
sys.path.insert(0, str(d/'code'))
import t16_helpers
''' + CODE + '''
def learner(get_y, model):
    dls = DataBlock((ImageBlock, CategoryBlock), get_items=get_image_files, get_y=get_y,
                    splitter=RandomSplitter(seed=0)).dataloaders(d/'imgs', bs=4, num_workers=0)
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), path=d)

helper = learner(t16_helpers.label, t16_helpers.TinyNet())
helper.export(d/'helper.pkl')                                         # t16_helpers.label, t16_helpers.TinyNet
learner(label, TinyNet()).export(d/'main.pkl', pickle_module=pickle)  # __main__.label, __main__.TinyNet (pickle: older fastai)
torch.save(helper.model.state_dict(), d/'weights.pth')
helper.save('saved')                                                  # Learner.save: d/models/saved.pth
class TypeDispatch: pass                                              # what a learner of fastai < 2.8 refers to
TypeDispatch.__module__ = 'fastcore.dispatch'
fastcore.dispatch.TypeDispatch = TypeDispatch
helper.old = TypeDispatch(); helper.export(d/'old.pkl'); del helper.old, fastcore.dispatch.TypeDispatch
helper.dls.device = torch.device('cuda')                              # a GPU export: DataLoaders on CUDA, tensors tagged cuda:0
with mock.patch('torch.serialization.location_tag', lambda storage: 'cuda:0'): helper.export(d/'gpu.pkl')
'''

# runs each command of a JSON file in a child process, forked once the CLI is imported: {name: {rc, err}}
RUNNER = '''
import json, multiprocessing as mp, os, sys
from fastai_cam.cli import main

def child(argv, cwd, err):
    os.chdir(cwd)
    fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC); os.dup2(fd, 1); os.dup2(fd, 2)
    sys.exit(main(argv))

if __name__ == '__main__':
    ctx = mp.get_context('fork' if 'fork' in mp.get_all_start_methods() else 'spawn')
    res = {}
    for name,(argv,cwd) in json.loads(open(sys.argv[1]).read()).items():
        err = os.path.join(sys.argv[2], name + '.txt')
        p = ctx.Process(target=child, args=(argv, cwd, err)); p.start(); p.join()
        res[name] = dict(rc=p.exitcode, err=open(err).read())
    print(json.dumps(res))
'''


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py: one torch thread (the machine is shared)


@pytest.fixture(scope='module')
def made(tmp_path_factory):
    "The exported files, the images, and the user's code: `t16_helpers.py` moved away after the export, the notebook's code in a file"
    d = tmp_path_factory.mktemp('load')
    (d/'code').mkdir(); (d/'code'/'t16_helpers.py').write_text(CODE)
    (d/'imgs').mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        x = rng.integers(0, 120, (32, 32, 3)).astype(np.uint8); x[..., i % 3] += 120
        Image.fromarray(x).save(d/'imgs'/f"{'rgb'[i % 3]}_{i}.png")
    (d/'make.py').write_text(MAKE)
    p = subprocess.run([sys.executable, d/'make.py', d], capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    (d/'moved').mkdir(); shutil.move(d/'code'/'t16_helpers.py', d/'moved'/'t16_helpers.py')   # the helper module moved away
    (d/'t16_nbcode.py').write_text(CODE)   # the notebook's definitions, copied into a file
    b = (d/'helper.pkl').read_bytes(); (d/'cut.pkl').write_bytes(b[:len(b) // 2])
    return d


@pytest.fixture(scope='module')
def runs(made, tmp_path_factory):
    "Every command, run once: `{name: {'rc': exit status, 'err': stdout and stderr}}`"
    d,logs = made, tmp_path_factory.mktemp('logs')
    (d/'run').mkdir()
    def explain(model, name, *extra, cwd=d/'run'):
        return [['explain', str(model), str(d/'imgs'), '--out', str(d/'out'/name), '-q', *map(str, extra)], str(cwd)]
    cmds = dict(
        module_missing=explain(d/'helper.pkl', 'module_missing'),
        module_fixed=explain(d/'helper.pkl', 'module_fixed', '--import', d/'moved'/'t16_helpers.py', '--save-maps'),
        module_by_name=explain(d/'helper.pkl', 'module_by_name', '--import', 't16_helpers', '--save-maps', cwd=d/'moved'),
        main_missing=explain(d/'main.pkl', 'main_missing'),
        main_fixed=explain(d/'main.pkl', 'main_fixed', '--import', d/'t16_nbcode.py', '--save-maps'),
        state_dict=explain(d/'weights.pth', 'state_dict'),
        saved=explain(d/'models'/'saved.pth', 'saved'),
        truncated=explain(d/'cut.pkl', 'truncated'),
        old_fastai=explain(d/'old.pkl', 'old_fastai', '--import', d/'moved'/'t16_helpers.py'),
        gpu=explain(d/'gpu.pkl', 'gpu', '--import', d/'moved'/'t16_helpers.py', '--save-maps'),
        missing_file=explain(d/'no_such.pkl', 'missing_file'),
        bad_import=explain(d/'helper.pkl', 'bad_import', '--import', 'nothere.py'))
    (logs/'cmds.json').write_text(json.dumps(cmds))
    (logs/'runner.py').write_text(RUNNER)
    p = subprocess.run([sys.executable, logs/'runner.py', logs/'cmds.json', logs], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])


@pytest.fixture(scope='module')
def reference(made):
    "`learn.cam` of the two learners, loaded in this process with their code: `{file name: CAMResult}`"
    files = sorted(get_image_files(made/'imgs'), key=str)
    try:
        yield {m: load_cam_learner(made/f'{m}.pkl', imports=made/code).cam(files)
               for m,code in [('helper', 'moved/t16_helpers.py'), ('main', 't16_nbcode.py')]}
    finally:
        for m in ('t16_helpers', 't16_nbcode'): sys.modules.pop(m, None)


def failed(run, *says):
    "The command failed as a mistake in the command (exit status 2), with a message and no traceback"
    assert run['rc'] == 2, run
    assert 'Traceback' not in run['err'] and 'UnboundLocalError' not in run['err'], run['err']
    for s in says: assert s in run['err'], (s, run['err'])


def same_as(made, run, name, res):
    "The command succeeded, and its CSV and raw maps are those of the in-process `learn.cam` result `res`"
    assert run['rc'] == 0, run['err']
    out = made/'out'/name
    with open(out/'predictions.csv', newline='') as f: rows = list(csv.DictReader(f))
    assert [Path(r['file']).name for r in rows] == [Path(f).name for f in sorted(get_image_files(made/'imgs'), key=str)]
    assert all(r['error'] == '' for r in rows) and len(rows) == len(res) == 12
    assert [r['pred'] for r in rows] == res.pred_labels
    np.testing.assert_allclose([float(r['cls_prob']) for r in rows], res.probs.numpy(), atol=2e-6)
    np.testing.assert_allclose([float(r['pred_prob']) for r in rows], res.preds.max(-1)[0].numpy(), atol=2e-6)
    with np.load(out/'maps.npz') as z: maps = np.stack([z[r['file']] for r in rows])
    np.testing.assert_allclose(maps, res.raw.numpy(), rtol=1e-5, atol=1e-6)


def test_the_files_refer_to_the_users_code(made):
    "The scan reads the references without loading: module-level names for the helper, `__main__` for the notebook"
    helper,main = set(pickle_needs(made/'helper.pkl')), set(pickle_needs(made/'main.pkl'))
    assert {('t16_helpers', 'label'), ('t16_helpers', 'TinyNet')} <= helper
    assert {('__main__', 'label'), ('__main__', 'TinyNet')} <= main and not any(m == 't16_helpers' for m,_ in main)


def test_missing_module(made, runs):
    failed(runs['module_missing'], "t16_helpers.label", "t16_helpers.TinyNet", "no module named 't16_helpers'",
           "--import path/to/t16_helpers.py", "pass the file that defines them")
    assert not (made/'out'/'module_missing').exists()   # nothing was written


def test_missing_main_function(runs):
    failed(runs['main_missing'], "__main__.label, __main__.TinyNet", "defined in the notebook or script that exported",
           "--import helpers.py")


def test_import_file_fixes_missing_module(made, runs, reference):
    same_as(made, runs['module_fixed'], 'module_fixed', reference['helper'])


def test_import_module_name_from_current_folder(made, runs, reference):
    same_as(made, runs['module_by_name'], 'module_by_name', reference['helper'])


def test_import_file_stands_in_for_main(made, runs, reference):
    same_as(made, runs['main_fixed'], 'main_fixed', reference['main'])


def test_weights_are_not_a_learner(runs):
    failed(runs['state_dict'], "a state dict: the weights of a model (14 tensors)", "learn.load(")
    failed(runs['saved'], "what Learner.save writes", "learn.load(")


def test_truncated(runs):
    failed(runs['truncated'], "is truncated", "export or copy it again")


def test_older_fastai(runs):
    failed(runs['old_fastai'], "exported with fastai < 2.8", "fastcore.dispatch.TypeDispatch", "pip install 'fastai<2.8'",
           "learn.load('weights')")


def test_gpu_export_loads_on_cpu(made, runs, reference):
    "Tensors tagged cuda:0 and DataLoaders on CUDA: loaded on the CPU, the same maps (a CUDA-only forward is not tested here)"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='CUDA'): torch.load(made/'gpu.pkl', weights_only=False)   # really tagged cuda
    same_as(made, runs['gpu'], 'gpu', reference['helper'])
    for cpu in (True, False):
        learn = load_cam_learner(made/'gpu.pkl', imports=made/'moved'/'t16_helpers.py', cpu=cpu)
        dev = torch.device('cpu') if cpu else default_device()
        assert (learn.dls.device, next(learn.model.parameters()).device) == (dev, dev)


def test_missing_file_and_bad_import(runs):
    failed(runs['missing_file'], "no model file", "no_such.pkl")
    failed(runs['bad_import'], "cannot import nothere.py: there is no such file")
