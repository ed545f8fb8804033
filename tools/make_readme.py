"Make README.md from nbs/index.ipynb without quarto (nbdev-readme needs quarto, which cannot be installed here)"
import re, sys
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter

root = Path(__file__).resolve().parents[1]

def readme_text()->str:
    nb = nbformat.read(root/'nbs'/'index.ipynb', as_version=4)
    keep = []
    for c in nb.cells:
        src = c.source.lstrip()
        if c.cell_type == 'code' and src.startswith('#| hide'): continue
        c.source = '\n'.join(l for l in c.source.splitlines() if not l.startswith('#|'))
        for k in ('id',): c.pop(k, None)
        keep.append(c)
    nb.cells = keep
    md,_ = MarkdownExporter().from_notebook_node(nb)
    # nbdev's "> description" line under the title becomes a blockquote, as nbdev-readme renders it
    md = re.sub(r'\n{3,}', '\n\n', md).strip() + '\n'
    return '<!-- WARNING: generated from nbs/index.ipynb by tools/make_readme.py; edit the notebook -->\n\n' + md

if __name__ == '__main__':
    txt = readme_text()
    if '--check' in sys.argv:
        ok = (root/'README.md').read_text() == txt
        print('README.md is up to date' if ok else 'README.md is stale: run python tools/make_readme.py')
        sys.exit(0 if ok else 1)
    (root/'README.md').write_text(txt)
    print('wrote README.md')
