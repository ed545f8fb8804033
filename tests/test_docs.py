"The documentation site: render the saved notebooks with tools/render_docs.py (nothing is executed) and check the pages"
import importlib.util, json
from html.parser import HTMLParser
from pathlib import Path
import nbformat, pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
spec = importlib.util.spec_from_file_location('render_docs', ROOT/'tools'/'render_docs.py')
rd = importlib.util.module_from_spec(spec); spec.loader.exec_module(rd)

# pages that must show at least one figure (their notebooks plot)
WITH_FIGURES = ['index', 'tutorial', 'gallery', 'layers', 'learner', 'targets', 'segmentation', 'serving', 'tracker',
                'tracking', 'transformers', 'trust']

class Page(HTMLParser):
    "ids, links, image sources and error-coloured elements of an HTML page"
    def __init__(self, text):
        super().__init__(); self.ids,self.hrefs,self.imgs,self.red = set(),[],[],0
        self.feed(text)
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get('id'): self.ids.add(a['id'])
        if a.get('name') and tag == 'a': self.ids.add(a['name'])
        if tag == 'a' and a.get('href') is not None: self.hrefs.append(a['href'])
        if tag == 'img': self.imgs.append(a.get('src', ''))
        if 'ansi-red' in (a.get('class') or ''): self.red += 1

def _external(url): return '://' in url or url.startswith(('mailto:', 'data:', '//', 'javascript:'))

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp('site')
    written = rd.render(NBS, out, quiet=True)
    return out, {p.name: Page(p.read_text(encoding='utf-8')) for p in written}

def test_page_names():
    test = lambda a,b: rd.page_name(a) == b
    assert test('00_core.ipynb', 'core.html') and test('index.ipynb', 'index.html')
    assert test('11_gallery.ipynb', 'gallery.html') and test('nbs/03a_learner.ipynb', 'learner.html')
    assert rd.slugify('Learner.show_cam') == 'learner.show_cam' and rd.slugify('Install and run') == 'install-and-run'

def test_every_notebook_has_a_page(site):
    out,pages = site
    want = {rd.page_name(p) for p in rd.notebooks(NBS)}
    assert want == set(pages), f'missing pages: {want - set(pages)}'
    assert {'index.html', 'tutorial.html', 'gallery.html', 'layers.html', 'core.html', 'learner.html'} <= want
    for name,pg in pages.items():   # the navigation bar links every page
        assert {rd.page_name(p) for p in rd.notebooks(NBS)} <= set(pg.hrefs), f'{name}: navigation bar incomplete'

def _nb_images(nb):
    return sum('image/png' in o.get('data', {}) or 'image/svg+xml' in o.get('data', {})
               for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []))

def test_figures(site):
    out,pages = site
    for p in rd.notebooks(NBS):
        name = rd.page_name(p)
        n = _nb_images(nbformat.read(p, as_version=4))
        if name[:-5] in WITH_FIGURES:
            assert n, f'{p.name} has no saved figure: run nbdev-test {p.relative_to(ROOT)} --save'
        if n: assert pages[name].imgs, f'{name}: the notebook has {n} figure(s) but the page shows none'
    for name,pg in pages.items():
        for src in pg.imgs:
            assert src.startswith('data:image/') or _external(src) or (out/src).exists(), f'{name}: broken image {src[:80]}'

def test_no_errors(site):
    out,pages = site
    for p in rd.notebooks(NBS):
        nb = json.loads(p.read_text())
        for c in nb['cells']:
            for o in c.get('outputs', []):
                assert o['output_type'] != 'error', f'{p.name}: saved error output in cell {c.get("id")}'
                txt = ''.join(o.get('text', '')) + ''.join(o.get('data', {}).get('text/plain', ''))
                assert 'Traceback' not in txt, f'{p.name}: a traceback is saved in cell {c.get("id")}'
    for name,pg in pages.items(): assert pg.red == 0, f'{name}: shows an error (ansi-red) block'

def test_links_resolve(site):
    out,pages = site
    bad = []
    for name,pg in pages.items():
        for url in pg.hrefs:
            if _external(url) or not url: continue
            path,_,anchor = url.partition('#')
            target = path or name
            if target not in pages: bad.append(f'{name}: {url} (no page {target})'); continue
            if anchor and anchor not in pages[target].ids: bad.append(f'{name}: {url} (no #{anchor} in {target})')
    assert not bad, 'broken links:\n' + '\n'.join(bad)
    assert 'core.html' in pages['index.html'].hrefs and 'tutorial.html' in pages['index.html'].hrefs

def test_processing(tmp_path):
    "hide cells and exported sources are dropped (API docs shown instead), echo: false keeps only the output, .ipynb links become pages"
    nbs = tmp_path/'nbs'; nbs.mkdir()
    cells = [new_markdown_cell('# Alpha\n> the description\n\nSee [beta](01_beta.ipynb#usage) and [me](#alpha).'),
             new_code_cell('#| hide\nSECRET_IMPORT = 1'),
             new_code_cell('#| export\ndef exported_fn(): pass'),
             new_code_cell('#| echo: false\nHIDDEN_SOURCE', outputs=[new_output('stream', name='stdout', text='SHOWN_OUTPUT\n')]),
             new_code_cell('#| output: false\nVISIBLE_SOURCE', outputs=[new_output('stream', name='stdout', text='DROPPED_OUTPUT\n')])]
    cells += [new_code_cell('#| default_exp core'), new_code_cell('#| export\ndef split_head(model): "stub"')]
    nbformat.write(new_notebook(cells=cells), nbs/'00_alpha.ipynb')
    nbformat.write(new_notebook(cells=[new_markdown_cell('# Beta\n\n## Usage\n\nback to [alpha](alpha.html#nowhere)')]), nbs/'01_beta.ipynb')
    rd.render(nbs, tmp_path/'out', quiet=True)
    a,b = (tmp_path/'out'/'alpha.html').read_text(), (tmp_path/'out'/'beta.html').read_text()
    for s in ['SECRET_IMPORT', 'exported_fn', 'HIDDEN_SOURCE', 'DROPPED_OUTPUT', '#|']: assert s not in a, s
    for s in ['SHOWN_OUTPUT', 'VISIBLE_SOURCE', 'href="beta.html#usage"', 'href="#alpha"', '<title>Alpha']: assert s in a, s
    # an exported function without a saved show_doc gets its API docs from the module, as nbdev adds them
    assert 'id="split_head"' in a and 'Find the layer whose output feeds the global pooling head' in a
    assert 'href="alpha.html"' in b and 'alpha.html#nowhere' not in b   # a dead anchor falls back to the page

def test_every_public_name_is_documented():
    "Each public name: a show_doc (a constant: prose) in its notebook, a docstring, a docments comment on each parameter"
    spec = importlib.util.spec_from_file_location('check_api_docs', ROOT/'tools'/'check_api_docs.py')
    cad = importlib.util.module_from_spec(spec); spec.loader.exec_module(cad)
    gaps = list(cad.problems())
    assert not gaps, '\n'.join(f'{nb} {name}: {"; ".join(i)}' for nb,name,i in gaps)


def test_title_with_backslash(tmp_path):
    "A backslash in a page's title is text, not an escape of the title's substitution"
    d = tmp_path/'nbs'; d.mkdir()
    nbformat.write(new_notebook(cells=[new_markdown_cell('# Windows paths: C:\\data\\x\n\n> where files live')]), d/'index.ipynb')
    rd.render(d, tmp_path/'site')
    assert '<title>Windows paths: C:\\data\\x</title>' in (tmp_path/'site'/'index.html').read_text()
