"""Overhead of `CAMTracker` on training: epochs of the demo model (`small_cnn` on `digit_dls`: 64x64 scenes, batch 64)
with and without a tracker of 16 held-out scenes, interleaved; and the cost of one record against a training batch.

    python benchmarks/tracker.py            # the demo's 6000 training and 1000 validation scenes, 3 rounds
    python benchmarks/tracker.py --quick    # 1000 and 200 scenes, 3 rounds (about a minute)

An epoch here is what `learn.fit(1)` does: the training batches, then the validation set. Each epoch is timed in
wall-clock seconds and in CPU seconds of this process: with one torch thread, the CPU time barely depends on what
else the machine runs, while a shared machine's load can change an epoch's wall time by 2x between rounds. The
tracker adds one record per epoch (`every='epoch'`, the default), so its share of an epoch is also measured directly:
one record's CPU time over one epoch's."""
from __future__ import annotations
import argparse, math, time
import torch
from _common import *

def interleaved_wall_cpu(fns:dict, rounds:int, warmup:int=1)->tuple:
    "`_common.interleaved`, keeping both the wall-clock and the CPU seconds (this process) of each call"
    names = list(fns)
    for _ in range(warmup):
        for n in names: fns[n]()
    wall,cpu = {n:[] for n in names},{n:[] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t,c = time.perf_counter(), time.process_time()
            fns[n]()
            wall[n].append(time.perf_counter() - t); cpu[n].append(time.process_time() - c)
    return wall, cpu

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='1000 training scenes (about a minute)')
    p.add_argument('--n-train', type=int, default=None, help='training scenes (default 6000, quick 1000)')
    p.add_argument('--rounds', type=int, default=3, help='interleaved rounds of epochs (default 3)')
    p.add_argument('--items', type=int, default=16, help='tracked scenes (default 16)')
    p.add_argument('--methods', default='cam', help="tracker methods timed over whole epochs, comma-separated "
                   "(default 'cam'; the record rows always time 'cam' and 'gradcam')")
    add_common_args(p)
    a = p.parse_args(argv)
    setup(a)
    from fastai.vision.all import Learner, accuracy, set_seed, first
    from fastai_cam.data import digit_dls, small_cnn
    from fastai_cam.tracker import CAMTracker
    t0 = time.time()
    n_train = a.n_train or (1000 if a.quick else 6000)
    n_valid = 200 if a.quick else 1000
    set_seed(0)
    dls = digit_dls(n_train, n_valid, size=64, bs=64)
    learn = Learner(dls, small_cnn(), metrics=accuracy)
    items = list(dls.valid_imgs[:a.items])
    trackers = {m: CAMTracker(items, method=m) for m in ('cam', 'gradcam')}

    def epoch(cbs):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cbs)
    fns = {'plain': lambda: epoch([]), **{m: (lambda t=trackers[m]: epoch([t])) for m in a.methods.split(',')}}
    wall,cpu = interleaved_wall_cpu(fns, rounds=a.rounds)

    for t in trackers.values(): t.learn = learn        # `fit(cbs=)` detached them
    xb,yb = first(dls.train)
    def train_batch():
        learn.model.train()
        learn.loss_func(learn.model(xb), yb).backward()
        learn.opt.step(); learn.opt.zero_grad()
    _,small = interleaved_wall_cpu({'batch': train_batch, **{m: t.record for m,t in trackers.items()}}, rounds=20, warmup=2)
    ep = med(cpu['plain'])

    print(f"## CAMTracker overhead ({machine()}; {a.rounds} rounds; total {time.time()-t0:.0f} s)\n")
    print(f"Demo model `small_cnn()` on `digit_dls({n_train}, {n_valid}, size=64, bs=64)`: {len(dls.train)} training "
          f"batches per epoch; {a.items} tracked scenes; one record per epoch.\n")
    rows = []
    for m in a.methods.split(','):
        r = ratio(cpu, m, 'plain')
        rows.append([f"epoch with `CAMTracker(method='{m}')` / epoch without, CPU time", fmt_s(med(cpu[m])),
                     fmt_s(med(cpu['plain'])), fmt_r(r), goal_str(r, 1.03) if m == 'cam' else 'report'])
        rows.append([f"the same, wall-clock time (load-dependent)", fmt_s(med(wall[m])), fmt_s(med(wall['plain'])),
                     fmt_r(ratio(wall, m, 'plain')), ''])
    for m in trackers:
        share = med(small[m]) / ep
        rows.append([f"one record (`'{m}'`, {a.items} items) / epoch without, CPU time", fmt_s(med(small[m])), fmt_s(ep),
                     f"{100*share:.2f}%", f"<= 3%: {'met' if share <= 0.03 else 'MISSED'}" if m == 'cam' else 'report'])
    for m in trackers:
        rows.append([f"one record (`'{m}'`) / one training batch (forward, backward, step), CPU time", fmt_s(med(small[m])),
                     fmt_s(med(small['batch'])), fmt_r(ratio(small, m, 'batch')), ''])
    print(table(['measurement', 'tracked', 'baseline', 'ratio', 'goal'], rows))
    for m in trackers:
        k = ratio(small, m, 'batch') / 0.03
        print(f"\nWith `every=n`, `'{m}'` records cost <= 3% of the training time from n = {max(1, math.ceil(k))} batches.",
              end='')
    print()

if __name__ == '__main__': main()
