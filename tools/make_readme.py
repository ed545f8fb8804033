"Make README.md from nbs/index.ipynb without quarto (nbdev-readme needs quarto, which cannot be installed here)"
import re, sys
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter

root = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from render_docs import directives   # the `#|` directives, read as the docs renderer reads them
FIGS = 'index_files'   # the README's figures (saved outputs of index.ipynb), where nbdev-readme puts them too

def docs_url()->str:
    "The documentation site (`Documentation` in pyproject.toml's [project.urls]), ending with /"
    import tomllib
    url = tomllib.loads((root/'pyproject.toml').read_text())['project']['urls']['Documentation']
    return url.rstrip('/') + '/'

def readme_text()->tuple:
    "The README's markdown and its figures `{relative path: bytes}`"
    nb = nbformat.read(root/'nbs'/'index.ipynb', as_version=4)
    keep = []
    for c in nb.cells:
        src = c.source.lstrip()
        if c.cell_type == 'code' and 'hide' in directives(c.source)[0]: continue   # `#| hide` anywhere in the leading directives
        if c.cell_type == 'code' and re.search(r'^#\|\s*echo:\s*false', c.source, re.M): c.metadata['tags'] = ['remove_input']
        c.source = '\n'.join(l for l in c.source.splitlines() if not l.startswith('#|'))
        keep.append(c)
    nb.cells = keep
    from traitlets.config import Config
    c = Config(); c.TagRemovePreprocessor.enabled = True; c.TagRemovePreprocessor.remove_input_tags = {'remove_input'}
    ex = MarkdownExporter(config=c)
    md,res = ex.from_notebook_node(nb, resources={'output_files_dir': FIGS})
    # nbdev's "> description" line under the title becomes a blockquote, as nbdev-readme renders it
    md = re.sub(r'\n[ \t]+\n', '\n\n', md)
    md = re.sub(r'!\[png\]\(', '![output](', md)
    # links to the pages (`tutorial.html`) point at the documentation site, so they work on GitHub and PyPI
    md = re.sub(r'\]\((?![a-z]+:|#|/)([\w\-]+\.html(#[^)]*)?)\)', lambda m: f']({docs_url()}{m.group(1)})', md)
    md = re.sub(r'\n{3,}', '\n\n', md).strip() + '\n'
    figs = {k: v for k,v in res.get('outputs', {}).items()}
    return '<!-- WARNING: generated from nbs/index.ipynb by tools/make_readme.py; edit the notebook -->\n\n' + md, figs

def _stale(figs):
    d = root/FIGS
    return [p for p in d.rglob('*') if p.is_file() and str(p.relative_to(root)) not in figs] if d.exists() else []

if __name__ == '__main__':
    txt,figs = readme_text()
    if '--check' in sys.argv:
        ok = (root/'README.md').read_text() == txt and not _stale(figs) and \
             all((root/k).exists() and (root/k).read_bytes() == v for k,v in figs.items())
        print('README.md is up to date' if ok else 'README.md is stale: run python tools/make_readme.py')
        sys.exit(0 if ok else 1)
    for p in _stale(figs): p.unlink()
    for k,v in figs.items():
        (root/k).parent.mkdir(parents=True, exist_ok=True); (root/k).write_bytes(v)
    (root/'README.md').write_text(txt)
    print(f'wrote README.md' + (f' and {len(figs)} figure(s) in {FIGS}/' if figs else ''))
