import json, os, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
out = os.environ.get("OUT", "/tmp/out")
runs = []
def add(name, rule, **o):
    o.setdefault("device", "cpu")
    runs.append((name, rule, o))
for s in (1, 2):
    add(f"pub-r-k1-T300-lr0.05-s{s}", "published", k=1, logit_scale=300, lr=0.05, seed=s)
    add(f"lat-r-k1-T300-sgd0.1-s{s}", "latent", k=1, logit_scale=300, inner="sgd", lr=0.1, loss_scale="mean", seed=s)
    add(f"lat-r-k1-T1000-sgd0.1-s{s}", "latent", k=1, logit_scale=1000, inner="sgd", lr=0.1, loss_scale="mean", seed=s)
    add(f"lat-r-k1-T1000-lr1e-2-s{s}", "latent", k=1, logit_scale=1000, lr=1e-2, seed=s)
add("pub-r-k1-T1000-lr0.05", "published", k=1, logit_scale=1000, lr=0.05)
add("pub-r-k1-T100-lr0.05", "published", k=1, logit_scale=100, lr=0.05)
add("pub-r-k1-T300-lr0.02", "published", k=1, logit_scale=300, lr=0.02)
add("pub-r-k5-T300-lr0.01", "published", k=5, logit_scale=300, lr=0.01)
add("pub-r-k10-T300-lr5e-3", "published", k=10, logit_scale=300, lr=5e-3)
add("pub-t-k1-T300-lr0.05", "published", k=1, logit_scale=300, lr=0.05, granularity="tensor")
add("pub-r-k1-T1-lr0.05", "published", k=1, lr=0.05)
todo = sys.argv[1:] or [r[0] for r in runs]
env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="src", PYTHONUNBUFFERED="1")
t0 = time.time()
def one(r):
    name, rule, o = r
    seed = o.get("seed", 0)
    p = subprocess.run([sys.executable, "tmp/f2sweep/screen.py", "/tmp/runs", name, rule, json.dumps(o)],
                       capture_output=True, text=True, env=env)
    line = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else json.dumps(dict(name=name, error=p.stderr[-800:]))
    with open(f"{out}/sweep.jsonl", "a") as f:
        f.write(line + "\n")
    print(f"{time.time()-t0:6.0f}s {line}", flush=True)
with ThreadPoolExecutor(int(os.environ.get("JOBS", "15"))) as ex:
    list(ex.map(one, [r for r in runs if r[0] in todo]))
