"""Headless Chromium for the browser tests (tests/test_app.py, tests/test_report.py) and the screenshots of the
serving page (nbs/19_serving.ipynb): selenium driving Debian's `chromium` and `chromium-driver` packages, which
.ci/run installs when they are missing (`apt-get install -y chromium chromium-driver`). Nothing is downloaded: the
driver is given by path, so selenium's own driver manager never runs, and the browser only talks to 127.0.0.1 and
`file://`. Set FASTAI_CAM_SKIP_BROWSER=1 to skip the browser tests on a machine without Chromium (CI never does).
"""
from __future__ import annotations
import os, shutil, tempfile, time
from contextlib import contextmanager

FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--hide-scrollbars', '--force-device-scale-factor=1']
SKIP_ENV = 'FASTAI_CAM_SKIP_BROWSER'

def missing()->str|None:
    "What is missing to run headless Chromium here, or None"
    need = []
    if not (shutil.which('chromium') or shutil.which('chromium-browser')): need.append('chromium')
    if not shutil.which('chromedriver'): need.append('chromium-driver')
    if need: return f"apt-get install -y {' '.join(need)}"
    try: import selenium  # noqa: F401
    except ImportError: return 'pip install selenium'
    return None

def require(pytest):
    "In a test: skip if FASTAI_CAM_SKIP_BROWSER is set, else fail loudly when Chromium cannot run"
    if os.environ.get(SKIP_ENV): pytest.skip(f'{SKIP_ENV} is set')
    m = missing()
    if m: pytest.fail(f'headless Chromium is needed for this test: {m} (or set {SKIP_ENV}=1 to skip it)')

@contextmanager
def chromium(width:int=1280, height:int=900, js:bool=True):
    "A selenium `webdriver.Chrome` on headless Chromium with a fresh profile, closed on exit"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which('chromium') or shutil.which('chromium-browser')
    profile = tempfile.mkdtemp(prefix='fcam_chromium_')
    for f in FLAGS + [f'--user-data-dir={profile}', f'--window-size={width},{height}']: opts.add_argument(f)
    if not js: opts.add_experimental_option('prefs', {'profile.managed_default_content_settings.javascript': 2})
    drv = webdriver.Chrome(service=Service(shutil.which('chromedriver')), options=opts)
    try: yield drv
    finally:
        drv.quit(); shutil.rmtree(profile, ignore_errors=True)

def wait_for(drv, script:str, timeout:float=30, every:float=0.1):
    "Run the JavaScript `script` (e.g. 'return ...') until it returns something truthy; that value"
    t_end = time.time() + timeout
    while True:
        v = drv.execute_script(script)
        if v: return v
        if time.time() > t_end: raise TimeoutError(f'waited {timeout}s for: {script}')
        time.sleep(every)

def full_page(drv, width:int|None=None):
    "Make the window as tall as the page, so a screenshot shows all of it"
    w = width or drv.execute_script('return window.innerWidth')
    h = drv.execute_script('return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)')
    drv.set_window_size(w, h + drv.execute_script('return window.outerHeight - window.innerHeight'))

def screenshot(drv):
    "The window as a PIL image (RGB)"
    import io
    from PIL import Image
    return Image.open(io.BytesIO(drv.get_screenshot_as_png())).convert('RGB')

# the drawn box of an <img>: its content box, less the bands that `object-fit: contain` leaves
IMG_BOX = """
const im = arguments[0], r = im.getBoundingClientRect(), s = getComputedStyle(im);
let x = r.left + parseFloat(s.borderLeftWidth) + parseFloat(s.paddingLeft), y = r.top + parseFloat(s.borderTopWidth) + parseFloat(s.paddingTop);
let w = im.clientWidth - parseFloat(s.paddingLeft) - parseFloat(s.paddingRight), h = im.clientHeight - parseFloat(s.paddingTop) - parseFloat(s.paddingBottom);
if (s.objectFit === 'contain' || s.objectFit === 'scale-down') {
  const k = Math.min(w / im.naturalWidth, h / im.naturalHeight, s.objectFit === 'scale-down' ? 1 : Infinity);
  x += (w - im.naturalWidth * k) / 2; y += (h - im.naturalHeight * k) / 2; w = im.naturalWidth * k; h = im.naturalHeight * k;
}
return [x, y, w, h];
"""

def image_crop(drv, shot, el, size):
    "The pixels of the <img> `el` in the screenshot `shot`, resized to `size` (w,h): a numpy uint8 array"
    import numpy as np
    from PIL import Image
    x,y,w,h = drv.execute_script(IMG_BOX, el)
    box = tuple(int(round(v)) for v in (x + 1, y + 1, x + w - 1, y + h - 1))   # 1px in: no blending with the page
    return np.asarray(shot.crop(box).resize(size, Image.BOX)).astype(np.int16)
