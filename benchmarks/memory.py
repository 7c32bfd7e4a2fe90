"""The memory guard's estimate against the measured peak (issue 17).

    python benchmarks/memory.py [--json PATH] [--sizes 256,512,1024] [--steps 3] [--model shapes]

Each size runs in a fresh process: the model is loaded and warmed up with a 64 px run, then one run at the
size, with and without ``AttentionRecorder(kind="both")`` (self-attention made explicitly: the quadratic
term). On CPU the measured peak is the growth of the process's peak resident memory (``VmHWM``, reset
through ``/proc/self/clear_refs`` just before the run) over its resident memory then; on CUDA, ``torch.cuda.max_memory_allocated`` over what was allocated
before. ``ratio`` = estimate / measured: above 1 the guard errs on the safe side.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch, lab
size, steps, model, record, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", sys.argv[5]
pipe = lab.load(model, device=device)
pipe.sampler("a red circle", steps=2, seed=0, progress=False).run()
recorders = [lab.AttentionRecorder(kind="both", max_bytes=2**40)] if record else []
s = pipe.sampler("a red circle", steps=steps, seed=0, height=size, width=size, recorders=recorders, progress=False)
est = None
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
else:
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident size, to the current one
        f.write("5")
    before = rss()
s.step()  # binds the recorders: the estimate below is the one the guard checked
est = s.memory_estimate()
run = s.run()
if device == "cuda":
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - before
else:
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    peak = hwm - before
print(json.dumps({"size": size, "steps": steps, "record": record, "estimate_mb": est.total / 2**20,
                  "parts_mb": {k: v / 2**20 for k, v in est.parts.items()}, "measured_mb": peak / 2**20}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,512,1024")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    for size in [int(x) for x in args.sizes.split(",")]:
        for record in (0, 1):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(size), str(args.steps), args.model, str(record),
                                   args.device], capture_output=True, text=True)
            if proc.returncode:
                last = proc.stderr.strip().splitlines()[-1]
                rows.append({"size": size, "record": bool(record), "refused": last})
                print(f"{size:5d} px  record={'both' if record else 'none':4s}  {last[:300]}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["ratio"] = row["estimate_mb"] / max(row["measured_mb"], 1e-9)
            rows.append(row)
            print(f"{size:5d} px  record={'both' if record else 'none':4s}  estimate {row['estimate_mb']:9.1f} MB  "
                  f"measured {row['measured_mb']:9.1f} MB  ratio {row['ratio']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "model": args.model, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
