"`fastai-cam explain` end to end: folders, lists, bad files, resuming, maps, two processes; and `learn.cam(dl=)` at scale"
import io, csv, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image
from fastai.vision.all import vision_learner, resnet18, Learner, CrossEntropyLossFlat, load_learner
from fastai_cam.callback import synth_image_dls
from fastai_cam.learner import count_forwards
from fastai_cam.explain import _cli, explain_run, EXPLAIN_COLUMNS

N_OK = 20
ROOT = Path(__file__).resolve().parents[1]
# subprocesses import this checkout's package (whatever else is installed) and run one thread each
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore',
       'PYTHONPATH': os.pathsep.join([str(ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])}


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py: one torch thread (the machine is shared)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "An exported tiny learner, 20 images (6 in a subfolder) and a corrupt .png"
    d = tmp_path_factory.mktemp('explain')
    learn = vision_learner(synth_image_dls(), resnet18, pretrained=False)
    learn.export(d/'model.pkl')
    rng = np.random.default_rng(0)
    for i in range(N_OK):
        p = d/'imgs'/('sub' if i >= 14 else '')/f'img{i:02d}.png'
        p.parent.mkdir(parents=True, exist_ok=True)
        x = rng.integers(0, 120, (32, 32, 3)).astype(np.uint8); x[..., i % 3] += 120
        Image.fromarray(x).save(p)
    (d/'imgs'/'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
    return d


def cli(*args):
    "Run `fastai-cam explain` in-process: (exit status, stderr)"
    try: _cli([str(a) for a in args]); return 0
    except SystemExit as e: return e.code


def read_rows(out):
    with open(out/'predictions.csv', newline='') as f: return list(csv.DictReader(f))


def overlays(out): return sorted(str(p.relative_to(out)) for p in Path(out).rglob('*.png'))


def check_folder_result(out, rows):
    assert len(rows) == N_OK + 1 and list(rows[0]) == EXPLAIN_COLUMNS
    bad = [r for r in rows if r['error']]
    assert len(bad) == 1 and Path(bad[0]['file']).name == 'corrupt.png' and bad[0]['overlay'] == ''
    assert [r['file'] for r in rows] == sorted(r['file'] for r in rows)
    ok = [r for r in rows if not r['error']]
    assert overlays(out) == sorted(r['overlay'] for r in ok)
    assert sum('/' in o for o in overlays(out)) == 6           # the subfolder is kept
    assert all(r['pred'] in 'rgb' and 0 < float(r['cls_prob']) <= 1 and r['method'] == 'cam' for r in ok)
    assert all(Image.open(out/r['overlay']).size == (32, 32) for r in ok)


def test_folder_module_entry(data, tmp_path):
    "`python -m fastai_cam.explain` over a folder with a corrupt file: 20 overlays, 21 rows, the bad file on stderr, exit 0"
    out = tmp_path/'out'
    p = subprocess.run([sys.executable, '-m', 'fastai_cam.explain', data/'model.pkl', data/'imgs', '--out', out, '-q'],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    assert 'corrupt.png' in p.stderr
    check_folder_result(out, read_rows(out))


def test_list_file_same_result(data, tmp_path, capsys):
    "A `@list.txt` of the same paths gives the same overlays and rows as the folder"
    files = sorted(str(p) for p in (data/'imgs').rglob('*.png'))
    (tmp_path/'list.txt').write_text('# images\n' + '\n'.join(files) + '\n\n')
    assert cli(data/'model.pkl', data/'imgs', '--out', tmp_path/'a', '-q') == 0
    assert cli(data/'model.pkl', f"@{tmp_path/'list.txt'}", '--out', tmp_path/'b', '-q') == 0
    err = capsys.readouterr().err
    assert err.count('corrupt.png') == 2
    check_folder_result(tmp_path/'b', read_rows(tmp_path/'b'))
    assert overlays(tmp_path/'a') == overlays(tmp_path/'b')
    assert read_rows(tmp_path/'a') == read_rows(tmp_path/'b')


def test_only_corrupt_fails(data, tmp_path, capsys):
    (tmp_path/'bad'/'deep').mkdir(parents=True)
    for n in ['a.png', 'deep/b.jpg']: (tmp_path/'bad'/n).write_bytes(b'not an image')
    rc = cli(data/'model.pkl', tmp_path/'bad', '--out', tmp_path/'out', '-q')
    err = capsys.readouterr().err
    assert rc == 1
    assert 'none of the 2 files could be explained' in err and 'a.png' in err and 'b.jpg' in err
    rows = read_rows(tmp_path/'out')
    assert len(rows) == 2 and all(r['error'] for r in rows) and overlays(tmp_path/'out') == []
    # nothing to explain at all is a usage error
    (tmp_path/'empty').mkdir()
    assert cli(data/'model.pkl', tmp_path/'empty', '--out', tmp_path/'out2', '-q') == 2
    assert 'No image files found' in capsys.readouterr().err


def test_command_error_said_once(data, tmp_path, capsys):
    "A target that does not fit the model (a region of a classifier's output) is the command's mistake: exit 2, said once"
    rc = cli(data/'model.pkl', data/'imgs'/'sub', '--out', tmp_path/'out', '--target', 'region', '--method', 'gradcam', '-q')
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count('RegionTarget explains a segmentation output') == 1 and 'fail the same way alone' in err
    assert 'cannot explain' not in err and 'Exception occured' not in err


def test_two_truncated_copies_are_file_errors(data, tmp_path, capsys):
    "Two copies of one truncated JPEG fail the same way alone, but a decoding error is the files': two error rows, the rest explained"
    d = tmp_path/'imgs'; d.mkdir()
    for i,f in enumerate(sorted((data/'imgs'/'sub').glob('*.png'))[:4]): (d/f'{i+2}.png').write_bytes(f.read_bytes())
    x = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO(); Image.fromarray(x).save(buf, 'JPEG', quality=95)      # cut in half: PIL's verify() lets it through
    for n in ('0.jpg', '1.jpg'): (d/n).write_bytes(buf.getvalue()[:len(buf.getvalue())//2])
    assert cli(data/'model.pkl', d, '--out', tmp_path/'out', '-q') == 0
    rows = read_rows(tmp_path/'out')
    assert [bool(r['error']) for r in rows] == [True, True, False, False, False, False]
    assert 'fail the same way' not in capsys.readouterr().err


def test_multi_map_runs_and_skip_existing(data, tmp_path, capsys):
    "Several maps per image: the summary counts images; --skip-existing redoes such a run rather than keep a stale overlay"
    out = tmp_path/'out'
    assert cli(data/'model.pkl', data/'imgs'/'sub', '--out', out) == 0                  # leaves img14.png ...
    assert cli(data/'model.pkl', data/'imgs'/'sub', '--out', out, '--cls', 'r,g') == 0   # img14.r.png, img14.g.png ...
    assert 'Explained 6 of 6 images' in capsys.readouterr().out
    first = read_rows(out)
    assert len(first) == 12 and all(r['overlay'] and not r['error'] for r in first)
    assert cli(data/'model.pkl', data/'imgs'/'sub', '--out', out, '--cls', 'r,g', '--skip-existing') == 0
    assert 'Explained 6 of 6 images' in capsys.readouterr().out
    again = read_rows(out)
    assert [(r['file'], r['overlay'], r['cls']) for r in again] == [(r['file'], r['overlay'], r['cls']) for r in first]


def assert_same_rows(r1, r2, num=('pred_prob', 'cls_prob')):
    "The same rows, their probabilities (6 decimals) up to float rounding: a batch of another size can change the last digit"
    assert [{k: v for k, v in r.items() if k not in num} for r in r1] == [{k: v for k, v in r.items() if k not in num} for r in r2]
    for a, b in zip(r1, r2):
        for k in num:
            if a[k]: assert abs(float(a[k]) - float(b[k])) < 1e-5


def test_skip_existing(data, tmp_path, capsys):
    "A second run with --skip-existing recomputes and rewrites nothing, and keeps the rows; another method or layer is redone"
    out = tmp_path/'out'
    assert cli(data/'model.pkl', data/'imgs', '--out', out, '-q', '--save-maps') == 0
    rows = read_rows(out)
    mt = {p: p.stat().st_mtime_ns for p in out.rglob('*.png')}
    assert len(mt) == N_OK
    learn = load_learner(data/'model.pkl')
    with count_forwards(learn.model) as c:
        res, n_ok, n = explain_run(learn, [data/'imgs'], out, skip_existing=True, save_maps=True, progress=False, log=lambda m: None)
    assert c.n == 0 and (n_ok, n) == (N_OK, N_OK + 1)
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*.png')} == mt
    assert read_rows(out) == rows
    with np.load(out/'maps.npz') as z: assert len(z.files) == N_OK
    # a deleted overlay is the only one redone
    victim = out/[r for r in rows if not r['error']][0]['overlay']; victim.unlink()
    assert cli(data/'model.pkl', data/'imgs', '--out', out, '-q', '--skip-existing') == 0
    assert victim.exists()
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*.png') if p != victim} == {p: t for p, t in mt.items() if p != victim}
    assert_same_rows(read_rows(out), rows)   # the victim, redone in a batch of its own: its probabilities up to float rounding
    capsys.readouterr()
    assert cli(data/'model.pkl', data/'imgs', '--out', out, '--skip-existing') == 0    # the summary counts the kept ones apart
    assert f"Explained 0 of {N_OK + 1} images, kept {N_OK} explained by an earlier run (--skip-existing)" in capsys.readouterr().out
    # a request that differs from the previous rows (method and layer) is explained again, not kept
    assert cli(data/'model.pkl', data/'imgs', '--out', out, '--skip-existing', '--method', 'gradcam', '--layer', '0.6') == 0
    assert f"Explained {N_OK} of {N_OK + 1} images in" in capsys.readouterr().out
    ok = [r for r in read_rows(out) if not r['error']]
    assert len(ok) == N_OK and {(r['method'], r['layer']) for r in ok} == {('gradcam', '0.6')}
    assert all(p.stat().st_mtime_ns != mt[p] for p in mt if p != victim)


def test_save_maps(data, tmp_path):
    "maps.npz holds the raw map of each of the 20 images, keyed by file, equal to `learn.cam`'s"
    out = tmp_path/'out'
    assert cli(data/'model.pkl', data/'imgs', '--out', out, '-q', '--save-maps', '--method', 'gradcam', '--layer', '0.6') == 0
    rows = [r for r in read_rows(out) if not r['error']]
    with np.load(out/'maps.npz') as z: maps = {k: z[k] for k in z.files}
    assert sorted(maps) == sorted(r['file'] for r in rows) and len(maps) == N_OK
    assert {m.shape for m in maps.values()} == {(2, 2)}
    learn = load_learner(data/'model.pkl')
    files = [r['file'] for r in rows[:5]]
    res = learn.cam(files, method='gradcam', layer='0.6')
    np.testing.assert_allclose(np.stack([maps[f] for f in files]), res.raw.numpy(), atol=1e-5)
    assert [r['cls_prob'] for r in rows[:5]] == [f"{p:.6f}" for p in res.probs.tolist()]


def test_two_processes_same_as_one(data, tmp_path):
    "torchrun with 2 processes (gloo, CPU): the same overlays, rows and maps as one process, no partial file left"
    one, two = tmp_path/'one', tmp_path/'two'
    assert cli(data/'model.pkl', data/'imgs', '--out', one, '-q', '--save-maps') == 0
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
                        '-m', 'fastai_cam.explain', data/'model.pkl', data/'imgs', '--out', two, '-q', '--save-maps'],
                       capture_output=True, text=True, env=ENV, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert overlays(one) == overlays(two)
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))        # no partial csv/npz, no temp file
    r1, r2 = read_rows(one), read_rows(two)
    assert len(r2) == N_OK + 1
    num = ('pred_prob', 'cls_prob')
    assert [{k: v for k, v in r.items() if k not in num} for r in r1] == [{k: v for k, v in r.items() if k not in num} for r in r2]
    for a, b in zip(r1, r2):
        for k in num:
            if a[k]: assert abs(float(a[k]) - float(b[k])) < 1e-5
    with np.load(one/'maps.npz') as z1, np.load(two/'maps.npz') as z2:
        assert sorted(z1.files) == sorted(z2.files) and len(z1.files) == N_OK
        for k in z1.files: np.testing.assert_allclose(z1[k], z2[k], atol=1e-5)
    for o in overlays(one):     # same pictures (the maps are the same up to float rounding)
        d = np.abs(np.asarray(Image.open(one/o), dtype=int) - np.asarray(Image.open(two/o), dtype=int))
        assert (d > 2).mean() < 0.01, o


def tiny_cnn_learner(dls):
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    return Learner(dls, nn.Sequential(body, head), loss_func=CrossEntropyLossFlat())


@pytest.mark.parametrize('method', ['cam', 'gradcam'])
def test_cam_dl_equals_item_by_item(method):
    "`learn.cam(dl=)` over 210 images (4 batches) equals `learn.cam(item)` called on each item"
    torch.manual_seed(0)
    dls = synth_image_dls(n=840, bs=64)
    learn = tiny_cnn_learner(dls)
    res = learn.cam(dl=dls.valid, method=method)
    items = dls.valid_ds.items
    assert len(items) == 210 and res.raw.shape == (210, 8, 8)
    with learn.no_bar(): singles = [learn.cam(i, method=method) for i in items]
    raw = torch.cat([s.raw for s in singles])
    assert raw.abs().max() > 1e-3                        # not trivially zero
    torch.testing.assert_close(res.raw, raw, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.preds, torch.cat([s.preds for s in singles]), atol=1e-5, rtol=0)
    assert res.classes.tolist() == [s.classes.item() for s in singles]
    assert res.items.tolist() == list(range(210))
