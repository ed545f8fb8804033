"""`fastai-cam explain --html`: the report opened from disk in headless Chromium shows every card with its overlay,
its script sorts and filters (from the address, and from the controls), and without JavaScript it is the plain list"""
import csv, importlib.util
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from fastai.vision.all import vision_learner, resnet18
from fastai_cam.callback import synth_image_dls
from fastai_cam.explain import _cli
from fastai_cam.report import report_cards

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('browser', ROOT/'tools'/'browser.py')
browser = importlib.util.module_from_spec(spec); spec.loader.exec_module(browser)
CARDS = "return Array.from(document.querySelectorAll('.card'))"
ORDER = "return Array.from(document.querySelectorAll('.card')).filter(c => !c.hidden).map(c => +c.dataset.i)"


@pytest.fixture(scope='module')
def report(tmp_path_factory):
    "`fastai-cam explain --html` over 9 images in class folders ('r', 'g', 'b') and one outside; (out, cards)"
    d = tmp_path_factory.mktemp('report')
    torch.manual_seed(0)
    vision_learner(synth_image_dls(), resnet18, pretrained=False).export(d/'model.pkl')
    rng = np.random.default_rng(1)
    for i in range(10):
        f = d/'imgs'/('rgb'[i % 3] if i < 9 else 'other')/f'{i}.png'; f.parent.mkdir(parents=True, exist_ok=True)
        x = rng.integers(0, 120, (32, 32, 3)).astype(np.uint8); x[..., i % 3] += 120
        Image.fromarray(x).save(f)
    out = d/'out'
    with pytest.raises(SystemExit) as e:
        _cli([str(d/'model.pkl'), str(d/'imgs'), '--out', str(out), '--html', '--method', 'gradcam', '--layer', '0.5',
              '--no-title', '-q'])
    assert e.value.code == 0
    with open(out/'predictions.csv', newline='') as f: rows = list(csv.DictReader(f))
    return out, rows


@pytest.fixture(scope='module')
def drv():
    browser.require(pytest)
    with browser.chromium(1280, 800) as d: yield d


def test_every_card_shown(report, drv):
    "The whole page in one screenshot: ten cards, each inside it, each showing its overlay file's pixels"
    out,rows = report
    drv.get((out/'report.html').as_uri())
    browser.full_page(drv, 1280)     # tall enough for every lazy image to load, then as tall as the page with them
    browser.wait_for(drv, "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    browser.full_page(drv, 1280)
    shot = browser.screenshot(drv)
    cards = drv.execute_script(CARDS)
    assert len(cards) == len(rows) == 10
    for c,r in zip(cards, rows):
        x,y,w,h = drv.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width, r.height]", c)
        assert w > 100 and h > 100 and x >= 0 and y >= 0 and x + w <= shot.width and y + h <= shot.height, (x, y, w, h, shot.size)
        img = c.find_element('css selector', 'img')
        crop = browser.image_crop(drv, shot, img, (32, 32))
        over = np.asarray(Image.open(out/r['overlay'])).astype(np.int16)
        assert np.abs(crop - over).mean() < 6, r['overlay']
        text = c.text
        assert Path(r['file']).name in text and f"predicted {r['pred']} {float(r['pred_prob']):.3f}" in text, text


def test_sort_and_filter(report, drv):
    "Sorting by loss or confidence, and filtering, from the address and from the controls, give the orders computed here"
    out,rows = report
    cards = report_cards(rows, ['b', 'g', 'r'])      # from the CSV: the losses of wrong predictions are not in it
    url = (out/'report.html').as_uri()
    drv.get(url + '#sort=prob')
    by_prob = sorted(range(10), key=lambda i: (-cards[i]['prob'], i))
    assert drv.execute_script(ORDER) == by_prob != list(range(10))
    drv.get(url + '#sort=prob-asc&result=wrong')
    wrong = [i for i in sorted(range(10), key=lambda i: (cards[i]['prob'], i)) if cards[i]['right'] is False]
    assert drv.execute_script(ORDER) == wrong and 0 < len(wrong) < 9
    # the controls, as a user would use them: sort by loss, highest first; labelled images with a loss first
    drv.get(url)
    assert drv.execute_script(ORDER) == list(range(10))
    drv.execute_script("const s = document.querySelector('select[name=sort]'); s.value = 'loss'; "
                       "s.dispatchEvent(new Event('change', {bubbles: true}))")
    losses = [float(v) if v else None for v in drv.execute_script(
        "return Array.from(document.querySelectorAll('.card')).map(c => c.dataset.loss)")]
    known = [l for l in losses if l is not None]
    assert known == sorted(known, reverse=True) and losses[:len(known)] == known and len(known) == 9
    assert drv.execute_script('return location.hash') == '#sort=loss'
    drv.execute_script("const s = document.querySelector('select[name=actual]'); s.value = 'g'; "
                       "s.dispatchEvent(new Event('change', {bubbles: true}))")
    assert sorted(drv.execute_script(ORDER)) == [i for i,r in enumerate(rows) if Path(r['file']).parent.name == 'g']
    assert drv.execute_script("return document.getElementById('count').textContent") == '3 of 10 shown'


def test_without_javascript(report):
    "With JavaScript off: every card shown, in file order, and no controls"
    browser.require(pytest)
    out,rows = report
    with browser.chromium(1280, 800, js=False) as d:
        d.get((out/'report.html').as_uri() + '#sort=prob')
        cards = d.find_elements('css selector', '.card')
        assert [c.get_attribute('data-i') for c in cards] == [str(i) for i in range(10)]
        assert all(c.is_displayed() for c in cards)
        assert not d.find_element('id', 'controls').is_displayed()
        assert Path(rows[0]['file']).name in cards[0].text
