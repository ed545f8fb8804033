"""Render the notebooks in nbs/ to static HTML in _site/ without quarto (which cannot be installed here).

Nothing is executed: each page shows the outputs saved in its notebook (run `nbdev-test nbs/NAME.ipynb --save`
to refresh them). The notebook is processed the way nbdev's quarto pipeline does it: `#| hide` cells and
exported sources are dropped, `#| echo: false` and `show_doc` cells show only their output, `#|` directive
lines are removed, backticked names become links to their docs. `00_core.ipynb` becomes `core.html`
(the numeric prefix is stripped, as nbdev does), `index.ipynb` becomes `index.html`, and every page gets a
navigation bar. Usage: `python tools/render_docs.py [--out _site] [--nbs nbs]`.
"""
from __future__ import annotations
import argparse, base64, html, re, sys, unicodedata
from pathlib import Path
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

root = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- names and titles
_re_prefix = re.compile(r'^\d+[a-z]?_')

def page_name(nb:Path|str)->str:
    "`00_core.ipynb` -> `core.html`, `index.ipynb` -> `index.html`"
    return _re_prefix.sub('', Path(nb).stem) + '.html'

def notebooks(nbs:Path)->list:
    "The notebooks to render: index first, then in file order (names starting with `_` or `.` are skipped)"
    nbs = sorted(p for p in Path(nbs).glob('*.ipynb') if not p.name.startswith(('_', '.')))
    return sorted(nbs, key=lambda p: (p.stem != 'index', p.name))

def nb_title(nb)->tuple:
    "(title, description) from the first markdown cell's `# Title` and `> description` lines"
    for c in nb.cells:
        if c.cell_type != 'markdown': continue
        t = re.search(r'^#\s+(.+)$', c.source, re.M)
        d = re.search(r'^>\s*(.+)$', c.source, re.M)
        if t: return t.group(1).strip(), (d.group(1).strip() if d else '')
    return None, ''

# ---------------------------------------------------------------- cell processing (nbdev's doc processors)
_re_dir = re.compile(r'^\s*#\|\s*(.*?)\s*$')
_re_hide_line = re.compile(r'#\|\s*hide_line\s*$')
_re_ansi = re.compile(r'\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])')
_strip_magics = ('%load_ext', '%autoreload', '%reload_ext', '%matplotlib', '%config')

def directives(src:str)->tuple:
    "The `#|` directives of the cell's leading comment block as a dict, and the source without them"
    lines,d,i = src.splitlines(),{},0
    while i < len(lines) and (not lines[i].strip() or _re_dir.match(lines[i])):
        m = _re_dir.match(lines[i])
        if m:
            k,_,v = m.group(1).partition(':') if ':' in m.group(1) else m.group(1).partition(' ')
            d[k.strip()] = v.strip()
        i += 1
    return d, '\n'.join(lines[i:])

def _false(v): return str(v).strip().lower() in ('false', 'no', '0')

_hide_dirs = {'hide', 'export', 'exporti', 'default_exp'}
_out_keys = {'stream': ('name', 'text'), 'display_data': ('data', 'metadata'),
             'execute_result': ('data', 'metadata', 'execution_count'), 'error': ('ename', 'evalue', 'traceback')}

def terminal_text(text:str)->str:
    "What a terminal shows of `text`: each line keeps what follows its last carriage return (progress bars vanish)"
    lines = [l.rsplit('\r', 1)[-1].rstrip() for l in _re_ansi.sub('', text).split('\n')]
    lines = [l.lstrip('\u2588') for l in lines]   # fastprogress's console bar starts each write with a block
    return '\n'.join(l for l in lines if l.strip()) + ('\n' if any(l.strip() for l in lines) else '')

_re_source = re.compile(r'\[source\]\(([^)\s]*)\)\{[^}]*\}')

def _source_links(md:str)->str:
    "show_doc's `[source](url){target=...}` (quarto syntax) as an HTML link floated right"
    def _sub(m):
        url = re.sub(r'#LNone$', '', m.group(1))
        return f'<a class="fcam-source" href="{html.escape(url)}" target="_blank">source</a>'
    return _re_source.sub(_sub, md)

def _retina_size(out):
    "Show a matplotlib figure saved at retina resolution (nbdev-test's default) at its logical size, as Jupyter does"
    png,txt = out.data.get('image/png'), ''.join(out.data.get('text/plain', ''))
    if not png or not txt.startswith('<Figure size') or out.metadata.get('image/png', {}).get('width'): return
    head = base64.b64decode(''.join(png)[:64])
    if head[:8] != b'\x89PNG\r\n\x1a\n': return
    w,h = int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')
    out.metadata['image/png'] = {'width': w//2, 'height': h//2}

def _clean_output(o, linkify):
    "A fresh, schema-valid copy of output `o` (streams as a terminal shows them, markdown linkified), or None"
    kw = {k: o[k] for k in _out_keys.get(o.get('output_type'), ()) if k in o}
    out = new_output(o['output_type'], **kw)
    if out.output_type == 'stream':
        out.text = terminal_text(''.join(out.text))
        if not out.text: return None
    if 'data' in out:
        _retina_size(out)
        md = out.data.get('text/markdown')
        if md is not None: out.data['text/markdown'] = linkify(_source_links(''.join(md) if isinstance(md, list) else md))
    return out

# ---------------------------------------------------------------- API docs (nbdev's add_show_docs, without running the notebook)
_re_default_exp = re.compile(r'^\s*#\|\s*default_exp\s+(\S+)', re.M)
_re_showdoc_call = re.compile(r'^show_doc\(\s*([\w\.]+)\s*[,)]', re.M)

class ApiDocs:
    "`show_doc` markdown of a notebook's exported names, from its imported module (the notebook is not executed)"
    def __init__(self, nb, lib:str|None=None):
        self.ns = None
        m = next((_re_default_exp.search(c.source) for c in nb.cells if c.cell_type == 'code' and _re_default_exp.search(c.source)), None)
        if m is None or lib is None: return
        try:
            import importlib
            self.ns = vars(importlib.import_module(f'{lib}.{m.group(1)}'))
            from nbdev.showdoc import show_doc
            self.show_doc = show_doc
        except Exception as e: print(f'render_docs: no API docs for {lib}.{m.group(1)} ({e})', file=sys.stderr)
        self.shown = {m.group(1) for c in nb.cells if c.cell_type == 'code' for m in _re_showdoc_call.finditer(c.source)}

    def resolve(self, name:str):
        obj = self.ns
        for i,part in enumerate(name.split('.')):
            obj = obj.get(part) if i == 0 else getattr(obj, part, None)
            if obj is None: return None
        return obj

    def markdown(self, name:str)->str|None:
        "The `show_doc` markdown of `name`, or None"
        if self.ns is None: return None
        obj = self.resolve(name)
        if obj is None: return None
        try: return self.show_doc(obj)._repr_markdown_()
        except Exception as e: print(f'render_docs: show_doc({name}) failed ({e})', file=sys.stderr); return None

    def exported_names(self, src:str)->list:
        "Public functions and classes defined in `src` (a `@patch`ed method as `Type.name`) with no `show_doc` cell"
        import ast
        try: tree = ast.parse(src)
        except SyntaxError: return []
        names = []
        for n in tree.body:
            if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or n.name.startswith('_'): continue
            nm = n.name
            patched = any((isinstance(d, ast.Name) and d.id == 'patch') or (isinstance(d, ast.Call) and getattr(d.func, 'id', '') == 'patch')
                          for d in n.decorator_list)
            if patched and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.args.args and n.args.args[0].annotation is not None:
                nm = f'{ast.unparse(n.args.args[0].annotation)}.{n.name}'
            if nm not in self.shown: names.append(nm)
        return names

def _md_output(md:str): return new_output('display_data', data={'text/markdown': md, 'text/plain': md})

def process_cell(cell, linkify=lambda s: s, api:ApiDocs|None=None):
    "The cell as the docs show it (a new cell), or None to drop it"
    if cell.cell_type == 'markdown':
        d,src = directives(cell.source)
        if 'hide' in d or _false(d.get('include', 'true')): return None
        return new_markdown_cell(linkify(src), id=cell.get('id'))
    if cell.cell_type != 'code': return None
    d,src = directives(cell.source)
    if 'hide' in d or _false(d.get('include', 'true')): return None
    raw_outputs = list(cell.get('outputs', []))
    if api is not None and not raw_outputs:   # unsaved notebook: the API docs nbdev would add, from the module
        m = _re_showdoc_call.match(src.strip())
        names = [m.group(1)] if m else api.exported_names(src) if d.keys() & {'export', 'exports'} else []
        raw_outputs = [_md_output(md) for md in map(api.markdown, names) if md]
    outputs = [] if _false(d.get('output', 'true')) else [_clean_output(o, linkify) for o in raw_outputs]
    outputs = [o for o in outputs if o is not None]
    src = '\n'.join(l for l in src.splitlines() if not _re_hide_line.search(l) and not l.lstrip().startswith(_strip_magics))
    src = '\n'.join(l for l in src.splitlines() if not _re_dir.match(l)).strip()
    hide_src = (d.keys() & _hide_dirs) or _false(d.get('echo', 'true')) or src.startswith('show_doc(')
    if hide_src and not outputs: return None
    if not src and not outputs: return None
    c = new_code_cell(src, id=cell.get('id'), outputs=outputs)
    if hide_src: c.metadata['tags'] = ['remove_input']
    return c

def process_nb(nb, linkify=lambda s: s, lib:str|None=None):
    "A clean notebook (only nbformat's keys, so nbconvert accepts it) with the cells the docs show"
    api = ApiDocs(nb, lib) if lib else None
    cells = [c for c in (process_cell(c, linkify, api) for c in nb.cells) if c is not None]
    for i,c in enumerate(cells):
        if not c.get('id'): c['id'] = f'cell-{i}'
    res = new_notebook(cells=cells, metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
                                              'language_info': {'name': 'python'}})
    nbformat.validate(res)
    return res

def lib_name()->str|None:
    "The package documented by the notebooks (`lib_path` of its `_modidx`), importable from the repository root"
    try:
        if str(root) not in sys.path: sys.path.insert(0, str(root))
        from fastai_cam._modidx import d
        return d['settings']['lib_path']
    except Exception: return None

def make_linkify():
    "Backticked names -> links to their docs, as nbdev's `add_links` does (this package's links made relative)"
    try:
        from nbdev.doclinks import NbdevLookup
        from fastai_cam._modidx import d as modidx
        nl = NbdevLookup(strip_libs=('fastai_cam', 'fastai'))
        s = modidx['settings']
        host = s['doc_host'].rstrip('/') + '/' + s['doc_baseurl'].strip('/') + '/'
    except Exception as e:  # rendering works without links
        print(f'render_docs: no doc links ({e})', file=sys.stderr)
        return lambda md: md
    return lambda md: nl.linkify(md).replace('](' + host, '](') if md else md

# ---------------------------------------------------------------- HTML post-processing
def slugify(text:str)->str:
    "Pandoc's (and so quarto's) automatic identifier: lower case, keep alphanumerics `_-.`, spaces to `-`"
    s = unicodedata.normalize('NFKC', text).strip().lower()
    s = ''.join(ch for ch in s if ch.isalnum() or ch in '_-. ')
    s = re.sub(r'\s+', '-', s)
    s = re.sub(r'^[^a-z]+', '', s)
    return s or 'section'

_re_heading = re.compile(r'<h([1-6]) id="([^"]*)">(.*?)</h\1>', re.S)
_re_tags = re.compile(r'<[^>]+>')

def fix_headings(body:str)->str:
    "Give headings quarto's ids (so `core.html#cam_maps` resolves) and point their anchor links at them"
    seen = {}
    def _sub(m):
        level,old,inner = m.groups()
        text = html.unescape(_re_tags.sub('', inner.replace('¶', '')))
        base = slugify(text); n = seen.get(base, 0); seen[base] = n + 1
        new = base if n == 0 else f'{base}-{n}'
        inner = inner.replace(f'href="#{old}"', f'href="#{new}"')
        return f'<h{level} id="{new}">{inner}</h{level}>'
    return _re_heading.sub(_sub, body)

_re_href = re.compile(r'href="([^"]*)"')

def fix_nb_links(body:str)->str:
    "Links to notebooks (`01_methods.ipynb#x`) -> links to their pages (`methods.html#x`)"
    def _sub(m):
        url = m.group(1)
        if '://' in url or not re.match(r'^[^#?]*\.ipynb(#.*)?$', url): return m.group(0)
        path,_,anchor = url.partition('#')
        return f'href="{page_name(path)}' + (f'#{anchor}' if anchor else '') + '"'
    return _re_href.sub(_sub, body)

_re_id = re.compile(r'\sid="([^"]+)"')

def page_ids(body:str)->set: return set(_re_id.findall(body))

def drop_dead_anchors(body:str, ids:dict, page:str)->str:
    "Links `page.html#x` (or `#x`) whose anchor is not on that page link to the page itself"
    def _sub(m):
        url = m.group(1)
        if '://' in url or '#' not in url: return m.group(0)
        path,_,anchor = url.partition('#')
        target = path or page
        if target in ids and anchor and anchor not in ids[target]: return f'href="{path or "#"}"'
        return m.group(0)
    return _re_href.sub(_sub, body)

NAV_CSS = """
<style>
nav.fcam-nav{position:sticky;top:0;z-index:100;background:#2780e3;padding:.45rem 1rem;display:flex;flex-wrap:wrap;
  gap:.2rem 0;align-items:center;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;font-size:15px}
nav.fcam-nav a{color:#fff;text-decoration:none;opacity:.85}
nav.fcam-nav a:hover{opacity:1;text-decoration:underline}
nav.fcam-nav a.fcam-home{font-weight:700;opacity:1;margin-right:.6rem}
nav.fcam-nav a.fcam-current{opacity:1;font-weight:600;border-bottom:2px solid #fff}
nav.fcam-nav span.fcam-group{color:#cfe3fa;font-size:12px;text-transform:uppercase;letter-spacing:.05em;margin:0 .5rem 0 .4rem;
  padding-left:.8rem;border-left:1px solid #8fbdf0}
nav.fcam-nav span.fcam-group + a, nav.fcam-nav a + a{margin-left:.9rem}
body.jp-Notebook main{max-width:1100px;margin:0 auto;padding-top:.5rem}
.jp-MarkdownCell h1{margin-top:.6rem}
.fcam-first-md blockquote{border-left:none;padding-left:0;margin-left:0;font-size:1.15em;color:#555}
.jp-RenderedMarkdown.jp-OutputArea-output blockquote pre{white-space:pre-wrap}
.jp-RenderedMarkdown a code{color:#1a5fb4}
.jp-MarkdownCell .jp-RenderedMarkdown pre{background:#f6f8fa;border:1px solid #e5e7eb;border-radius:4px;padding:.6em .8em;margin:.4em 0 1em}
.jp-RenderedHTMLCommon table td,.jp-RenderedHTMLCommon table th,.jp-RenderedHTMLCommon table tr{text-align:left !important}
a.fcam-source{float:right;font-size:smaller}
.jp-RenderedMarkdown.jp-OutputArea-output h3{margin-top:.3em}
.jp-CodeCell .jp-InputArea-editor{background:#f6f8fa;border:1px solid #e5e7eb;border-radius:4px}
</style>
"""

def is_reference(nb)->bool:
    "A notebook that exports a module (`#| default_exp`) is reference; the others are guides"
    return any(c.cell_type == 'code' and re.search(r'^\s*#\|\s*default_exp\b', c.source, re.M) for c in nb.cells)

def nav_html(pages:list, current:str)->str:
    "The navigation bar: home, then the guides, then the reference pages, each group in file order"
    groups = {'Guides': [], 'Reference': []}
    for name,title,ref in pages:
        if name == 'index.html': continue
        cls = ' class="fcam-current"' if name == current else ''
        groups['Reference' if ref else 'Guides'].append(f'<a href="{name}"{cls}>{html.escape(title)}</a>')
    home = next((t for n,t,_ in pages if n == 'index.html'), 'Home')
    parts = [f'<a class="fcam-home" href="index.html">{html.escape(home)}</a>']
    for g,links in groups.items():
        if links: parts.append(f'<span class="fcam-group">{g}</span>' + ''.join(links))
    return '<nav class="fcam-nav">' + ''.join(parts) + '</nav>'

def _first_md_class(body:str)->str:
    "Mark the first markdown cell (title and description) so its `> description` reads as a lead, not a quote"
    return body.replace('jp-MarkdownCell jp-Notebook-cell"', 'jp-MarkdownCell jp-Notebook-cell fcam-first-md"', 1)

# ---------------------------------------------------------------- rendering
def exporter():
    from traitlets.config import Config
    from nbconvert import HTMLExporter
    c = Config()
    c.TagRemovePreprocessor.enabled = True
    c.TagRemovePreprocessor.remove_input_tags = {'remove_input'}
    c.HTMLExporter.exclude_input_prompt = True
    c.HTMLExporter.exclude_output_prompt = True
    return HTMLExporter(config=c, template_name='lab')

def render(nbs:Path|str=root/'nbs', out:Path|str=root/'_site', quiet:bool=False)->list:
    "Render every notebook of `nbs` to `out/<page>.html`; returns the written paths"
    nbs,out = Path(nbs),Path(out)
    out.mkdir(parents=True, exist_ok=True)
    linkify,ex,lib = make_linkify(),exporter(),lib_name()
    paths = notebooks(nbs)
    raw = [nbformat.read(p, as_version=4) for p in paths]
    pages = []
    for p,nb in zip(paths, raw):
        t,_ = nb_title(nb)
        pages.append((page_name(p), t or p.stem, is_reference(nb)))
    bodies = {}
    for p,nb,(name,title,_) in zip(paths, raw, pages):
        body,_ = ex.from_notebook_node(process_nb(nb, linkify, lib))
        body = fix_nb_links(fix_headings(body))
        t,desc = nb_title(nb)
        title = t if p.stem == 'index' else f'{t or p.stem} – fastai_cam'
        body = re.sub(r'<title>.*?</title>', lambda m: f'<title>{html.escape(title)}</title>', body, count=1, flags=re.S)   # a function: a backslash in the title is no escape
        if desc: body = body.replace('</title>', f'</title>\n<meta name="description" content="{html.escape(desc)}">', 1)
        body = body.replace('</head>', NAV_CSS + '</head>', 1)
        body = re.sub(r'(<body[^>]*>)', lambda m: m.group(1) + '\n' + nav_html(pages, name), body, count=1)
        bodies[name] = _first_md_class(body)
    ids = {n: page_ids(b) for n,b in bodies.items()}
    written = []
    for name,body in bodies.items():
        f = out/name
        f.write_text(drop_dead_anchors(body, ids, name), encoding='utf-8')
        written.append(f)
        if not quiet: print(f'wrote {f}')
    return written

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--nbs', default=str(root/'nbs'), help='folder of notebooks (default: nbs/)')
    ap.add_argument('--out', default=str(root/'_site'), help='output folder (default: _site/)')
    ap.add_argument('--quiet', action='store_true')
    a = ap.parse_args()
    render(a.nbs, a.out, a.quiet)
