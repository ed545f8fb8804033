"""List public names (each module's `__all__`) whose notebook lacks a `show_doc` (a constant: a markdown cell naming
it), that have no docstring, or whose parameters have no docments comment. `python tools/check_api_docs.py [--strict]`; exits 1 with --strict when anything is missing."""
import importlib, inspect, json, re, sys
from dataclasses import is_dataclass
from pathlib import Path
from fastcore.docments import docments

def nb_sources(nbs=Path(__file__).parent.parent/'nbs'):
    "`{module name: notebook source}` for every notebook with a `default_exp`"
    out = {}
    for nb in sorted(nbs.glob('*.ipynb')):
        cells = json.load(open(nb))['cells']
        src = '\n'.join(''.join(c['source']) for c in cells)
        md = '\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
        m = re.search(r'#\| default_exp (\S+)', src)
        if m and m.group(1) != 'all': out[m.group(1)] = (nb.name, src, md)   # `all` only re-exports
    return out

def undocumented_params(obj):
    "Parameters of `obj` with no docments comment (self, *args and **kwargs excepted)"
    f = obj.__init__ if inspect.isclass(obj) and not is_dataclass(obj) else obj   # a dataclass: comments on the fields
    try: sig, docs = inspect.signature(obj), docments(f, full=False)
    except (TypeError, ValueError, OSError): return []
    skip = {'self', 'cls', 'return'}
    return [n for n,p in sig.parameters.items() if n not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and not docs.get(n)]

def problems():
    for modname,(nb,src,md) in nb_sources().items():
        mod = importlib.import_module(f'fastai_cam.{modname}')
        for name in getattr(mod, '__all__', []):
            obj, issues = getattr(mod, name), []
            if getattr(obj, '__module__', mod.__name__) != mod.__name__: continue   # re-exported (99_all)
            if not callable(obj):   # a constant: show_doc cannot render a dict or list; described in prose instead
                if f'`{name}`' not in md: issues.append('constant not described in a markdown cell')
            elif not re.search(rf'show_doc\({re.escape(name)}\b', src): issues.append('no show_doc')
            if callable(obj):
                if not inspect.getdoc(obj): issues.append('no docstring')
                if not inspect.isclass(obj) or '__init__' in vars(obj) or is_dataclass(obj):
                    if (ps := undocumented_params(obj)): issues.append('params without docments: ' + ', '.join(ps))
            if issues: yield nb, name, issues

if __name__ == '__main__':
    found = list(problems())
    for nb,name,issues in found: print(f'{nb:22s} {name:22s} ' + '; '.join(issues))
    print(f'{len(found)} names with gaps')
    sys.exit(1 if found and '--strict' in sys.argv else 0)
