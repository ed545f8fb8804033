"""`fastai-cam app` end to end: the command serving on a free localhost port, called through `gradio_client` (alone and
by four clients at once) and opened in headless Chromium"""
import importlib.util, os, socket, subprocess, sys, threading, time
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
import httpx
from fastai.vision.all import vision_learner, resnet18, load_learner
from fastai_cam.callback import synth_image_dls
from fastai_cam.core import compute_cams
from fastai_cam.explain import blend_cams
from fastai_cam.app import app_predict

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('browser', ROOT/'tools'/'browser.py')
browser = importlib.util.module_from_spec(spec); spec.loader.exec_module(browser)
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'GRADIO_ANALYTICS_ENABLED': 'False',
       'PYTHONPATH': os.pathsep.join([str(ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])}
# (method, layer, class) of the requests; the app is started with '0.5' as its default layer
ASKS = [('gradcam', '0.5', 'predicted'), ('cam', '0', 'b'), ('layercam', '0.4', 'predicted'), ('gradcam++', '0.6', 'g')]


def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    "`python -m fastai_cam.app` on a free port over a tiny exported learner and 6 images; (url, port, learn, files)"
    d = tmp_path_factory.mktemp('app')
    torch.manual_seed(0)
    vision_learner(synth_image_dls(size=64), resnet18, pretrained=False).export(d/'model.pkl')
    rng = np.random.default_rng(0)
    (d/'imgs').mkdir()
    for i in range(6):
        x = rng.integers(0, 120, (64, 64, 3)).astype(np.uint8); x[..., i % 3] += 120
        Image.fromarray(x).save(d/'imgs'/f'{i}.png')
    port = free_port()
    p = subprocess.Popen([sys.executable, '-m', 'fastai_cam.app', d/'model.pkl', '--port', str(port), '--examples',
                          d/'imgs', '--methods', 'gradcam', 'cam,layercam', 'gradcam++', '--layers', '0.5', '0', '0.4', '0.6'],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f'http://127.0.0.1:{port}/'
    try:
        t_end = time.time() + 180
        while True:
            if p.poll() is not None: pytest.fail(f'the app exited ({p.returncode}): {p.stderr.read()}')
            try:
                if httpx.get(url, timeout=2).status_code == 200: break
            except httpx.HTTPError: pass
            if time.time() > t_end: pytest.fail('the app did not answer within 180 s')
            time.sleep(0.3)
        torch.set_num_threads(1)
        yield url, port, load_learner(d/'model.pkl', cpu=True), sorted((d/'imgs').glob('*.png'))
    finally:
        p.terminate()
        try: p.wait(20)
        except subprocess.TimeoutExpired: p.kill()


def reference(learn, f, method, layer, cls):
    "What `compute_cams` gives in this process for the image `f` alone: (probabilities, raw map)"
    xb = next(iter(learn.dls.test_dl([f], num_workers=0)))[0]
    vocab = list(learn.dls.vocab)
    out = compute_cams(learn.model.eval(), xb, method=method, layer=layer, cls=None if cls == 'predicted' else vocab.index(cls))
    return torch.softmax(out.logits, -1)[0], out.maps[0].numpy()


def ask(client, f, method, layer, cls):
    from gradio_client import handle_file
    return client.predict(handle_file(str(f)), method, layer, cls, 0.5, api_name='/explain')


def check(answer, learn, f, method, layer, cls):
    "The app's answer is the in-process computation: top classes, probabilities, the raw map, the downloads' names"
    pred,overlay,files,status = answer
    probs,raw = reference(learn, f, method, layer, cls)
    vocab = list(learn.dls.vocab)
    p,c = probs.sort(descending=True)
    assert [d['label'] for d in pred['confidences']] == [vocab[i] for i in c.tolist()]
    np.testing.assert_allclose([d['confidence'] for d in pred['confidences']], p.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.load(files[0]), raw, atol=1e-5)
    explained = vocab[int(c[0])] if cls == 'predicted' else cls
    assert [Path(x).name for x in files] == [f'{f.stem}.{method}.{layer}.{explained}.raw.npy', f'{f.stem}.{method}.{layer}.{explained}.png']
    assert status.startswith(f'**{method}** map of **{explained}**'), status
    assert np.array(Image.open(overlay)).shape == (256, 256, 3)     # 64 px shown 4x larger


def test_binds_localhost_only(served):
    "The server listens on 127.0.0.1 only (the kernel's table of listening TCP sockets)"
    url,port,_,_ = served
    rows = [l.split() for name in ('tcp', 'tcp6') for l in Path(f'/proc/net/{name}').read_text().splitlines()[1:]]
    listening = [r[1] for r in rows if r[3] == '0A' and int(r[1].split(':')[1], 16) == port]
    assert listening == ['0100007F:%04X' % port], listening


def test_client_answers_match(served):
    "gradio_client, one request at a time: each answer is what compute_cams gives in this process"
    from gradio_client import Client
    url,_,learn,files = served
    client = Client(url, verbose=False)
    for f,(m,l,c) in zip(files, ASKS): check(ask(client, f, m, l, c), learn, f, m, l, c)
    pred,overlay,dl,status = ask(client, files[0], 'cam', '0.6', 'predicted')     # CAM at an inner layer: an error
    assert not pred and (overlay, dl) == (None, None) and "method='gradcam'" in status, status


def test_four_clients_at_once(served):
    "Four clients, three requests each, all at once: every answer is the one computed alone (batched or not)"
    from gradio_client import Client
    url,_,learn,files = served
    answers,errors = {},[]
    def run(i):
        try:
            client = Client(url, verbose=False)
            for j in range(3):
                k = (i + j) % len(files); m,l,c = ASKS[(i + 2*j) % len(ASKS)]
                answers[i, j] = (files[k], m, l, c, ask(client, files[k], m, l, c))
        except Exception as e: errors.append(e)
    ths = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in ths: t.start()
    for t in ths: t.join(120)
    assert not errors, errors
    assert len(answers) == 12
    for f,m,l,c,a in answers.values(): check(a, learn, f, m, l, c)


def test_page_shows_the_overlay(served):
    "Headless Chromium: upload an image, the page shows the predictions and the overlay (its pixels, not the plain image)"
    browser.require(pytest)
    url,_,learn,files = served
    with browser.chromium(1200, 1000) as drv:
        drv.get(url)
        browser.wait_for(drv, "return document.querySelector('#fcam-input input[type=file]')")
        drv.find_element('css selector', '#fcam-input input[type=file]').send_keys(str(files[1]))
        img = browser.wait_for(drv, "const i = document.querySelector('#fcam-overlay img'); "
                                    "return i && i.complete && i.naturalWidth > 0 && i", timeout=60)
        preds = browser.wait_for(drv, "return document.querySelector('#fcam-preds').innerText")
        status = drv.execute_script("return document.querySelector('#fcam-status').innerText")
        r = app_predict(learn, [files[1]], ['gradcam'], ['0.5'], [None])[0]
        over = blend_cams(r.image[None], r.map[None], 0.5)[0].astype(np.int16)
        t_end = time.time() + 15                # the page may still be drawing the output (a busy machine): look again
        while True:
            img = drv.execute_script("return document.querySelector('#fcam-overlay img')")   # Gradio may have replaced it
            crop = browser.image_crop(drv, browser.screenshot(drv), img, (64, 64))
            d_over, d_plain = np.abs(crop - over).mean(), np.abs(crop - r.image.astype(np.int16)).mean()
            if (d_over < 8 and d_over < d_plain / 3) or time.time() > t_end: break
            time.sleep(0.3)
    assert preds.split()[:2] == ['Predictions', r.label] and status.startswith(f'gradcam map of {r.label}'), (preds, status)
    assert d_over < 8 and d_over < d_plain / 3, (d_over, d_plain)
