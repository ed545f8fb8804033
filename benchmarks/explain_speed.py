"""Speed and memory of `fastai-cam explain`, side by side with `learn.get_preds` in one run.

1. images/second of `explain` (CAM maps + overlay PNGs + predictions.csv) over 256 images (224x224, an exported
   resnet34 learner, pretrained=False, CPU) vs `learn.get_preds` on the same files and batch size, printed as a
   ratio (goal: explain within 1.3x of get_preds), and the same with `--html` (report.html too; issue 14: still
   within 1.3x). Runs alternate and the best of `--reps` is kept, as the machine is shared and noisy.
2. peak RSS of `learn.cam(dl=...)` over 2,000 images minus over 200 (goal: < 50 MB), each in a fresh subprocess
   reading `ru_maxrss`.

    python benchmarks/explain_speed.py            # the full run
    python benchmarks/explain_speed.py --quick    # fewer images and repetitions, to check that it runs
"""
import argparse, json, os, resource, subprocess, sys, tempfile, time, warnings
from pathlib import Path
warnings.filterwarnings('ignore')
import numpy as np
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))     # this checkout's fastai_cam, in this process and (PYTHONPATH) in subprocesses
ENV = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}


def make_images(d:Path, n:int, size:int=224, seed:int=0)->list:
    "`n` smooth random JPEGs (two folders, 'a' and 'b') of `size` pixels, reusing those already there"
    from PIL import Image
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        f = d/('ab'[i % 2])/f'{i:05d}.jpg'
        files.append(f)
        if f.exists(): continue
        f.parent.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        x = np.asarray(small).astype(np.int16) + rng.integers(-20, 20, (size, size, 3))
        Image.fromarray(x.clip(0, 255).astype(np.uint8)).save(f, quality=90)
    return files


def make_model(d:Path, files:list, arch:str='resnet34', size:int=224)->Path:
    "An exported `vision_learner(arch, pretrained=False)` on `files` (labels: the folder), trained on nothing"
    from fastai.vision.all import ImageDataLoaders, vision_learner, Resize, parent_label
    import torchvision.models as tvm
    dls = ImageDataLoaders.from_path_func(d, files[:16], parent_label, valid_pct=0.25, item_tfms=Resize(size), bs=8, num_workers=0)
    learn = vision_learner(dls, getattr(tvm, arch), pretrained=False)
    learn.export(d/'model.pkl')
    return d/'model.pkl'


def speed(d:Path, n:int, bs:int, reps:int):
    import torch
    from fastai.learner import load_learner
    from fastai_cam.explain import explain_run
    files = make_images(d/'imgs', n)
    model = make_model(d, files)
    learn = load_learner(model, cpu=True)
    print(f"speed: {n} images {224}x{224}, resnet34 (pretrained=False), bs={bs}, {torch.get_num_threads()} threads, CPU")
    def preds():
        with learn.no_bar(): learn.get_preds(dl=learn.dls.test_dl(files, bs=bs, num_workers=0))
    def explain(html=False):
        out = Path(tempfile.mkdtemp(dir=d))
        rows,n_ok,_ = explain_run(learn, files, out, bs=bs, progress=False, html=html)
        assert n_ok == n and (out/'report.html').exists() == html
    def explain_cli():
        out = Path(tempfile.mkdtemp(dir=d))
        (out/'list.txt').write_text('\n'.join(map(str, files)))
        subprocess.run([sys.executable, '-m', 'fastai_cam.explain', str(model), f"@{out/'list.txt'}", '--out', str(out),
                        '--bs', str(bs), '-q'], check=True, env=ENV)
    preds()     # warm up (first forward of a shape is slower)
    t = {'get_preds': [], 'explain': [], 'explain --html': []}
    for _ in range(reps):
        for k,f in (('get_preds', preds), ('explain', explain), ('explain --html', lambda: explain(html=True))):
            t0 = time.perf_counter(); f(); t[k].append(time.perf_counter() - t0)
    best = {k: min(v) for k,v in t.items()}
    for k,v in best.items(): print(f"  {k:14s} {n/v:7.1f} images/s  (best of {reps}: {v:.2f}s; all: {', '.join(f'{x:.2f}' for x in t[k])})")
    print(f"  ratio explain/get_preds time: {best['explain']/best['get_preds']:.2f}x  (goal: <= 1.3x)")
    print(f"  ratio explain --html/get_preds time: {best['explain --html']/best['get_preds']:.2f}x  (goal: <= 1.3x)")
    t0 = time.perf_counter(); explain_cli(); tc = time.perf_counter() - t0
    print(f"  the command, `python -m fastai_cam.explain` in a new process: {tc:.1f}s for {n} images "
          f"({n/tc:.1f} images/s, including imports and loading the model)")
    return model


def mem_child(model:str, imgs:str, n:int, bs:int):
    "In a fresh process: `learn.cam(dl=...)` over the first `n` images; prints the peak RSS (MB)"
    from fastai.learner import load_learner
    import fastai_cam.learner
    learn = load_learner(model, cpu=True)
    files = sorted(Path(imgs).rglob('*.jpg'))[:n]
    assert len(files) == n
    t0 = time.perf_counter()
    with learn.no_bar(): res = learn.cam(dl=learn.dls.test_dl(files, bs=bs, num_workers=0))
    assert res.raw.shape[0] == n
    print(json.dumps({'n': n, 'maxrss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      'seconds': time.perf_counter() - t0}))


def memory(d:Path, model:Path, n_small:int, n_big:int, bs:int):
    make_images(d/'imgs', n_big)
    res = {}
    for n in (n_small, n_big):
        p = subprocess.run([sys.executable, __file__, '--_mem', str(n), '--bs', str(bs), '--_model', str(model),
                            '--_imgs', str(d/'imgs')], capture_output=True, text=True, check=True,
                           env=ENV)
        res[n] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"  learn.cam(dl=...) over {n:5d} images: peak RSS {res[n]['maxrss_mb']:.0f} MB ({res[n]['seconds']:.0f}s)")
    diff = res[n_big]['maxrss_mb'] - res[n_small]['maxrss_mb']
    print(f"  peak RSS {n_big} images - {n_small} images: {diff:.1f} MB  (goal: < 50 MB)")


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--quick', action='store_true', help="64 images, memory over 400 vs 40, 1 repetition")
    p.add_argument('--n', type=int, default=None, help="images for the speed test (default 256)")
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--reps', type=int, default=None, help="repetitions of each timing (default 3)")
    p.add_argument('--dir', default=None, help="work folder (images are kept between runs; default: a temp folder)")
    p.add_argument('--no-memory', action='store_true')
    p.add_argument('--_mem', type=int, help=argparse.SUPPRESS)
    p.add_argument('--_model', help=argparse.SUPPRESS)
    p.add_argument('--_imgs', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._mem: mem_child(a._model, a._imgs, a._mem, a.bs); sys.exit()
    d = Path(a.dir or tempfile.mkdtemp(prefix='explain_bench_')); d.mkdir(parents=True, exist_ok=True)
    n = a.n or (64 if a.quick else 256)
    model = speed(d, n, a.bs, a.reps or (1 if a.quick else 3))
    if not a.no_memory:
        n_small,n_big = (40, 400) if a.quick else (200, 2000)
        print(f"memory: learn.cam(dl=...) (method 'cam', bs={a.bs}), each in a fresh process")
        memory(d, model, n_small, n_big, a.bs)
