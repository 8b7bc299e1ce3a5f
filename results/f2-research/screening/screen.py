"""Screening driver: python screen.py OUTDIR NAME RULE JSON_OVERRIDES  (RULE: published | latent)."""
import json, sys, contextlib, time
from pathlib import Path
from laperm.config import resolve_config
from laperm.train import train
from laperm.experiments import hooks

out, name, rule, over = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
cfg = resolve_config(dict(preset="f2", threads=1, progress=False, out=out, name=name, **over))
inner = hooks.InnerProbe(cfg)
recs = []
def on_epoch(r, m, o):
    inner.on_epoch(r, m, o); recs.append(r)
t0 = time.time()
with contextlib.ExitStack() as st:
    if rule == "latent":
        st.enter_context(hooks.LatentRule().watching())
    st.enter_context(inner.watching())
    s = train(cfg, on_epoch=on_epoch, log=lambda m: None, overwrite=True)
best_test = max(r["test_acc"] for r in recs if "test_acc" in r)
inner_best = max((r.get("inner_test_acc") or 0) for r in recs)
res = dict(name=name, rule=rule, over=over, final=s["final_test_acc"], best_test=s["best_test_acc"],
           selected=s["selected_test_acc"],
           inner_best=inner_best, recall=recs[-1].get("class_recall"), secs=round(time.time() - t0))
print(json.dumps(res), flush=True)
with open(Path(out) / "results.jsonl", "a") as f:
    f.write(json.dumps(res) + "\n")
