"Run every notebook in nbs/ as a test, so one pytest run reports the notebooks and the tests in tests/"
from pathlib import Path
import pytest
from nbdev.test import test_nb as run_notebook

NBS = sorted(p for p in (Path(__file__).parents[1]/'nbs').glob('*.ipynb') if not p.name.startswith('_'))

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_notebook(nb, monkeypatch):
    monkeypatch.chdir(nb.parent)
    ok,_ = run_notebook(nb, skip_flags=['notest', 'slow'], showerr=True)
    assert ok, f'{nb.name} failed (the cell and traceback are printed above)'
