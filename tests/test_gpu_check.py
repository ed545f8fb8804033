"tools/gpu_check.py is run by hand on a GPU; its CPU rehearsal runs here so that the script cannot rot unnoticed"
import os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, MPLBACKEND='Agg', OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'gpu_check.py'), '--dry-run', '--out', str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert 'all checks passed' in out and 'FAIL' not in out
    assert out.count('PASS') >= 30                      # every method, fp32 / fp16 / autocast, learner, explain
    assert (tmp_path/'gpu_show_cam.png').stat().st_size > 1000
