"CAMTracker with the rest of fastai: fine_tune, gradient accumulation, mixed precision, export, lr_find, predict, logging"
import random, sys, types, warnings
import numpy as np, pytest, torch
import matplotlib as mpl
from fastai.vision.all import (Learner, accuracy, set_seed, params, load_learner, GradientAccumulation, Callback,
                               MixedPrecision, first)
from fastai_cam.core import cam_maps, n_hooks
from fastai_cam.data import digit_dls, small_cnn
from fastai_cam.tracker import CAMTracker

pytestmark = pytest.mark.usefixtures('one_thread')

@pytest.fixture(scope='module')
def dls():
    return digit_dls(n_train=128, n_valid=32, size=32, digit_size=(11,16), noise=0, bs=32)

def learner(dls, *cbs, seed=0, **kw):
    "A tiny small_cnn learner, body and head in two parameter groups (so `freeze` freezes the body)"
    set_seed(seed)
    dls.train.rng = random.Random(seed)      # the training loader shuffles with its own generator
    return Learner(dls, small_cnn(ch=(8,16,16,32,32)), metrics=accuracy, cbs=list(cbs),
                   splitter=lambda m: [params(m[0]), params(m[1])], **kw)

def fit(learn, how='fit_one_cycle', *args):
    with learn.no_bar(), learn.no_logging(): getattr(learn, how)(*args)
    return learn

def same_training(a, b):
    assert torch.equal(torch.tensor(a.recorder.losses), torch.tensor(b.recorder.losses))
    for x,y in zip(a.model.state_dict().values(), b.model.state_dict().values()): assert torch.equal(x, y)

def imgs(dls, n=6): return list(dls.valid_imgs[:n])

def test_fine_tune_one_timeline(dls):
    "frozen then unfrozen fits: epochs and batches counted on, and the same training as without the tracker"
    base = fit(learner(dls), 'fine_tune', 2, 1e-2, 1)
    learn = fit(learner(dls, CAMTracker(imgs(dls), method='gradcam', every=3)), 'fine_tune', 2, 1e-2, 1)
    same_training(base, learn)
    tr = learn.cam_tracker
    n_iter = len(dls.train)   # 4 batches per epoch, 3 epochs: a record at batches 0, 3, 6, 9, 12
    assert tr.iters.tolist() == [0, 3, 6, 9, 12] and n_iter == 4
    assert torch.allclose(tr.epochs, torch.tensor([0, 3/4, 6/4, 9/4, 3]))
    assert tr.maps.shape == (5, 6, 8, 8) and tr.probs.shape == (5, 6)
    assert n_hooks(learn.model) == 0

def test_gradient_accumulation(dls):
    "records after the batches whose step is skipped, while gradients accumulate: same training"
    base = fit(learner(dls, GradientAccumulation(64)), 'fit', 2, 1e-2)
    learn = fit(learner(dls, GradientAccumulation(64), CAMTracker(imgs(dls), method='gradcam', every=1)), 'fit', 2, 1e-2)
    same_training(base, learn)
    assert len(learn.cam_tracker.records) == 1 + 2*len(dls.train)

def test_to_fp16_on_cpu(dls):
    "fastai's MixedPrecision autocasts on CUDA only: on a CPU it trains in float32, and the tracker changes nothing"
    with warnings.catch_warnings():   # on a CPU, fastai's autocast('cuda') and GradScaler('cuda') say they are disabled
        warnings.simplefilter('ignore')
        base = fit(learner(dls).to_fp16(), 'fit', 1, 1e-2)
        learn = fit(learner(dls, CAMTracker(imgs(dls))).to_fp16(), 'fit', 1, 1e-2)
    same_training(base, learn)
    assert learn.cam_tracker.maps.isfinite().all()

class CPUAutocast(Callback):
    "Make fastai's MixedPrecision autocast in bfloat16 on the model's device (its own autocast is CUDA's)"
    order = MixedPrecision.order + 1
    def before_fit(self):
        dev = next(self.learn.model.parameters()).device.type
        self.learn.mixed_precision.autocast = torch.autocast(dev, dtype=torch.bfloat16)

def test_mixed_precision_autocast(dls):
    "the records run under the training forward's autocast: bfloat16 logits, float32 maps close to float32's"
    seen = []
    learn = learner(dls, CAMTracker(imgs(dls), method='gradcam'), CPUAutocast()).to_bf16()
    h = learn.model[1][-1].register_forward_hook(lambda m,i,o: seen.append((len(o), o.dtype)))
    try: fit(learn, 'fit', 1, 1e-2)
    finally: h.remove()
    assert [d for n,d in seen if n == 6] == [torch.bfloat16]*2     # the tracker's 6 items, at the start and the end
    tr = learn.cam_tracker
    assert tr.records[-1].maps.dtype == torch.float16 and tr.maps.dtype == torch.float32
    ref = cam_maps(learn.model, tr._x[0], method='gradcam')      # float32, no autocast
    got = tr.maps[-1]
    corr = torch.nn.functional.cosine_similarity((got - got.mean((1,2), keepdim=True)).flatten(1),
                                                 (ref - ref.mean((1,2), keepdim=True)).flatten(1))
    assert corr.min() > 0.95, corr
    assert n_hooks(learn.model) == 0

def test_first_record_draws_no_random_number(dls):
    "the first record also makes the items' DataLoader and iterates it: random states are left as they were"
    learn = learner(dls, CAMTracker(dls.valid, n=5, cls='target'))
    states = lambda: (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    before = states()
    learn.cam_tracker.record()
    after = states()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])
    assert learn.cam_tracker.maps.shape == (1, 5, 8, 8)

def test_export_without_tracker_data(dls, tmp_path):
    tr = CAMTracker(imgs(dls, 16), boxes=dls.boxes[:16], every=1)
    learn = fit(learner(dls, tr), 'fit', 2, 1e-2)
    assert len(tr.records) == 9
    plain = learner(dls); plain.model.load_state_dict(learn.model.state_dict())
    learn.path = plain.path = tmp_path
    learn.export('tracked.pkl'); plain.export('plain.pkl')
    extra = (tmp_path/'tracked.pkl').stat().st_size - (tmp_path/'plain.pkl').stat().st_size
    kept = sum(r.maps.nbytes + r.scale.nbytes for r in tr.records) + tr._x[0].nbytes
    assert extra < 4000 < kept, (extra, kept)        # the tracker's settings only, not its data
    assert len(tr.records) == 9                     # exporting does not touch the live tracker
    loaded = load_learner(tmp_path/'tracked.pkl')
    t2 = loaded.cam_tracker
    assert (t2.records, t2.items, t2.boxes, t2._x, t2.images) == ([], None, None, None, None)
    assert (t2.method, t2.every) == ('cam', 1)
    with pytest.raises(ValueError, match='pickled learner'): t2.record()
    pred = loaded.predict(dls.valid_imgs[0])[2]      # a loaded learner predicts with its tracker attached
    assert torch.allclose(pred, learn.predict(dls.valid_imgs[0])[2], atol=1e-6)
    assert t2.records == []

def test_stands_aside(dls):
    "no record in lr_find, predict, get_preds or validate (their events look like a fit's)"
    learn = learner(dls, CAMTracker(imgs(dls)))
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=5, show_plot=False)
        learn.get_preds(); learn.validate(); learn.predict(dls.valid_imgs[0])
    assert learn.cam_tracker.records == [] and learn.cam_tracker._iters == 0
    fit(learn, 'fit', 1, 1e-2)
    assert learn.cam_tracker.iters.tolist() == [0, len(dls.train)]

def test_tensorboard(dls, tmp_path):
    pytest.importorskip('tensorboard')
    from fastai.callback.tensorboard import TensorBoardCallback
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    learn = learner(dls, CAMTracker(imgs(dls, 4)), TensorBoardCallback(tmp_path, trace_model=False, log_preds=False))
    fit(learn, 'fit', 2, 1e-2)
    ev = EventAccumulator(str(tmp_path)).Reload()
    logged = ev.Images('cam_tracker')
    assert [e.step for e in logged] == [0, len(dls.train), 2*len(dls.train)]
    assert all(e.width > 100 and e.height > 50 for e in logged)

def test_wandb_stand_in(dls, monkeypatch):
    "W&B is not installed here: a stand-in `wandb` module and a callback named WandbCallback show what is logged"
    logged = []
    fake = types.SimpleNamespace(Image=lambda fig: ('image', fig.get_size_inches().tolist()),
                                 log=lambda d, step: logged.append((d, step)))
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    class WandbCallback(Callback):
        def before_fit(self): self._wandb_step = -1
        def after_batch(self):
            if self.training: self._wandb_step += 1
    learn = learner(dls, CAMTracker(imgs(dls, 4)), WandbCallback())
    fit(learn, 'fit', 1, 1e-2)
    assert [s for _,s in logged] == [-1, len(dls.train) - 1]
    assert all(list(d) == ['cam_tracker'] and d['cam_tracker'][0] == 'image' for d,_ in logged)
    learn.cam_tracker.reset(); learn.cam_tracker.log = False
    fit(learn, 'fit', 1, 1e-2)
    assert len(logged) == 2 and len(learn.cam_tracker.records) == 2

def test_mp4(dls, tmp_path):
    "MP4 through matplotlib's ffmpeg writer, with the ffmpeg binary of imageio-ffmpeg when there is no system ffmpeg"
    imageio_ffmpeg = pytest.importorskip('imageio_ffmpeg')
    learn = fit(learner(dls, CAMTracker(imgs(dls, 4))), 'fit', 2, 1e-2)
    with mpl.rc_context({'animation.ffmpeg_path': imageio_ffmpeg.get_ffmpeg_exe()}):
        p = learn.cam_tracker.animate(tmp_path/'maps.mp4')
    assert imageio_ffmpeg.count_frames_and_secs(str(p))[0] == 3
    with mpl.rc_context({'animation.ffmpeg_path': str(tmp_path/'no-ffmpeg-here')}):
        with pytest.raises(RuntimeError, match='ffmpeg'): learn.cam_tracker.animate(tmp_path/'x.mp4')
