"""Load on `fastai-cam app`: N concurrent clients against the app on localhost, for a bounded time, side by side with
one client (issue 14: 4 clients for 60 s, no error, median latency <= 1.5x a single client's).

The app runs in its own process (`python -m fastai_cam.app MODEL --port P`), as a deployment would, on an exported
resnet18 learner (224x224, pretrained=False) unless `--model` is given. Each client is a thread that sends one
request after another for a phase, each request the way a browser's does it: upload the image, queue the
`/explain` event, read its result stream (Gradio's REST API: `/gradio_api/upload`, `/gradio_api/call/explain`).
Clients use plain `httpx`, not `gradio_client`, whose own work (about 70 ms of CPU a call here, on the cores the
server uses) would be measured instead of the server's. Phases alternate (one client, then N; the order rotates
each round), so the ratio is taken between phases run side by side; the result is the median over rounds of the
per-round ratio of median latencies. The script stops by itself; it prints a markdown table.

    python benchmarks/app_load.py                  # 4 clients, 60 s of load (and 60 s of one client), 4 rounds
    python benchmarks/app_load.py --quick          # 2 rounds of 5 s, to check that it runs
"""
import argparse, json, os, socket, statistics, subprocess, sys, tempfile, threading, time, warnings
from pathlib import Path
warnings.filterwarnings('ignore')
import httpx
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, table
from explain_speed import make_images, make_model


def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def start_app(model, port, method, max_batch_size, threads, workers=None, timeout=300):
    "The app in a new process; returns it once its page answers"
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'PYTHONWARNINGS': 'ignore', 'GRADIO_ANALYTICS_ENABLED': 'False',
           'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}
    p = subprocess.Popen([sys.executable, '-m', 'fastai_cam.app', str(model), '--port', str(port), '--methods', method,
                          '--max-batch-size', str(max_batch_size)] + (['--workers', str(workers)] if workers else []), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t_end = time.time() + timeout
    while time.time() < t_end:
        if p.poll() is not None: raise RuntimeError(f'the app exited: {p.stderr.read()}')
        try:
            if httpx.get(f'http://127.0.0.1:{port}/', timeout=2).status_code == 200: return p
        except httpx.HTTPError: pass
        time.sleep(0.5)
    p.kill(); raise TimeoutError('the app did not start')


def explain_call(h:httpx.Client, url:str, f:Path, method:str)->dict:
    "One request as the page makes it: upload, queue `/explain`, read the stream until the result; the status text"
    up = h.post(url + 'gradio_api/upload', files={'files': (f.name, f.read_bytes())}).json()[0]
    data = [{'path': up, 'meta': {'_type': 'gradio.FileData'}}, method, None, 'predicted', 0.5]
    ev = h.post(url + 'gradio_api/call/explain', json={'data': data}).json()['event_id']
    event = None
    with h.stream('GET', url + f'gradio_api/call/explain/{ev}') as r:
        for line in r.iter_lines():
            if line.startswith('event: '): event = line[7:]
            elif line.startswith('data: ') and event == 'complete': return json.loads(line[6:])[3]
            elif line.startswith('data: ') and event == 'error': raise RuntimeError(f'error event: {line[6:]}')
    raise RuntimeError('the stream ended without a result')


def cpu_seconds(pid=None)->float:
    "User + system CPU seconds of process `pid` (Linux /proc), or of this process"
    if pid is None: t = os.times(); return t.user + t.system
    f = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK')


def phase(url, files, method, n_clients, seconds, pid=None):
    "`n_clients` threads sending requests for `seconds`: (latencies, batch sizes, errors, CPU s of the app, CPU s of the clients)"
    lat,bs,errors = [],[],[]
    c0,a0 = cpu_seconds(), (cpu_seconds(pid) if pid else 0.)
    def client(i):
        k = 4 * i    # each client its own images: no two requests at once need the same cached file
        with httpx.Client(timeout=120) as h:
            t_end = time.time() + seconds
            while time.time() < t_end:
                t = time.perf_counter()
                try: status = explain_call(h, url, files[k % len(files)], method)
                except Exception as e: errors.append(repr(e)); continue
                finally: k += 1
                if not status.startswith(f'**{method}**'): errors.append(status); continue
                lat.append(time.perf_counter() - t); bs.append(int(status.rsplit('batch of ', 1)[1]))
    ths = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in ths: t.start()
    for t in ths: t.join()
    return lat, bs, errors, (cpu_seconds(pid) - a0 if pid else 0.), cpu_seconds() - c0


def main(a):
    import torch; torch.set_num_threads(a.threads)     # the made-up model's export here; the header's thread count
    d = Path(a.dir or tempfile.mkdtemp(prefix='app_load_'))
    files = make_images(d/'imgs', 16)
    model = Path(a.model) if a.model else make_model(d, files, arch=a.arch)
    port = free_port(); url = f'http://127.0.0.1:{port}/'
    t0 = time.time()
    p = start_app(model, port, a.method, a.max_batch_size, a.threads, a.workers)
    try:
        phase(url, files, a.method, a.clients, 3)      # warm-up
        T = a.seconds / a.rounds
        res = {1: [], a.clients: []}
        for r in range(a.rounds):
            for n in ((1, a.clients) if r % 2 == 0 else (a.clients, 1)):
                res[n].append(phase(url, files, a.method, n, T, p.pid))
                lat,bs,err = res[n][-1][:3]
                print(f"round {r+1}: {n} client(s): {len(lat)} requests, median {statistics.median(lat)*1000:.0f} ms, "
                      f"mean batch {statistics.mean(bs):.2f}, {len(err)} errors", flush=True)
    finally:
        p.terminate(); p.wait(30)
    one,many = res[1], res[a.clients]
    per_round = [statistics.median(m[0]) / statistics.median(o[0]) for o,m in zip(one, many)]
    allv = lambda rs, i: [x for r in rs for x in r[i]]
    errs = allv(one, 2) + allv(many, 2)
    ratio = statistics.median(per_round)
    print(f"\n{machine()}; {a.rounds} rounds of {T:.0f} s per phase; app: `python -m fastai_cam.app` ({a.arch if not a.model else model.name}, "
          f"{a.method}, max batch {a.max_batch_size}, workers {a.workers or 'per core'}, torch threads {a.threads}); total {time.time()-t0:.0f} s\n")
    rows = []
    for n,rs in ((1, one), (a.clients, many)):
        lat,bs = allv(rs, 0), allv(rs, 1)
        rows.append([f'{n} client{"s" if n > 1 else ""}', len(lat), f'{statistics.median(lat)*1000:.0f} ms',
                     f'{sorted(lat)[int(0.9*(len(lat)-1))]*1000:.0f} ms', f'{len(lat)/(a.seconds):.1f}/s',
                     f'{statistics.mean(bs):.2f}', len(allv(rs, 2))])
    print(table(['clients', 'requests', 'median latency', 'p90', 'throughput', 'mean batch', 'errors'], rows))
    print(f"\nmedian latency, {a.clients} clients / 1 client (median of per-round ratios {', '.join(f'{x:.2f}' for x in per_round)}): "
          f"{ratio:.2f}x (goal <= 1.5: {'met' if ratio <= 1.5 else 'MISSED'}); errors: {len(errs)}")
    # what the cores allow: each request costs CPU in the app and in the clients (same machine); with the cores busy,
    # n clients cannot be answered faster than n x that cost / cores
    cores = len(os.sched_getaffinity(0))
    cost = lambda rs: (sum(r[3] for r in rs) / len(allv(rs, 0)), sum(r[4] for r in rs) / len(allv(rs, 0)))
    (a1,c1),(an,cn) = cost(one), cost(many)
    floor = a.clients * (an + cn) / cores
    print(f"CPU per request: 1 client {a1*1000:.0f} ms in the app + {c1*1000:.0f} ms in the client; {a.clients} clients "
          f"{an*1000:.0f} + {cn*1000:.0f} ms. With {cores} cores, {a.clients} clients cannot get a median latency under "
          f"{a.clients} x {(an+cn)*1000:.0f} ms / {cores} = {floor*1000:.0f} ms = "
          f"{floor / statistics.median(allv(one, 0)):.2f}x the single client's median")
    for e in errs[:5]: print('  ', e)
    return 0 if not errs else 1


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--quick', action='store_true', help="2 rounds of 5 s per phase")
    p.add_argument('--seconds', type=float, default=60, help="seconds of load with N clients, in all rounds (default 60)")
    p.add_argument('--rounds', type=int, default=4)
    p.add_argument('--clients', type=int, default=4)
    p.add_argument('--method', default='gradcam')
    p.add_argument('--arch', default='resnet18', help="torchvision architecture of the made-up learner")
    p.add_argument('--model', default=None, help="an exported learner instead of the made-up one")
    p.add_argument('--max-batch-size', type=int, default=4)
    p.add_argument('--threads', type=int, default=1, help="torch threads of the app (default 1)")
    p.add_argument('--workers', type=int, default=None, help="batches the app computes at once (default: the app's, one per core)")
    p.add_argument('--dir', default=None, help="work folder (default: a temp folder)")
    a = p.parse_args()
    if a.quick: a.seconds,a.rounds = 10, 2
    sys.exit(main(a))
