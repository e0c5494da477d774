"""Has the pass or ``load`` slowed down against another revision? Two checkouts, alternated, each a ratio to timm.

Each round runs one child process per checkout (the order reversed every other round), with the checkout first on
``PYTHONPATH``. A child builds ``--model`` with ``timm.create_model`` and, in the same process, times
``share_transform.apply`` on it and ``share_transform.load`` of the file its own revision saved; it reports both
as ratios to its ``create_model`` times, which are the same code in every checkout. Those ratios, not absolute
times, are compared across revisions: a shared machine's drift moves a child's create_model with its own pass.
Only the API both revisions have is used (``build_model``, ``apply``, ``save``, ``load``).

    git worktree add /tmp/base dcb9bf7
    python benchmarks/against_revision.py --base /tmp/base [--head .] [--rounds 6] [--repeats 3] [--threads 1]

Prints, per revision, the median (min-max) over rounds of each child's median ratio, and head/base of those
medians: 1.05 means the head's pass is 5% slower relative to create_model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, statistics, sys, tempfile, time
from pathlib import Path
import timm, torch
import share_transform as st
model_name, repeats, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
create, apply_, load = [], [], []
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "model.safetensors"
    st.save(st.apply(st.build_model(model_name)), path)
    for _ in range(repeats):
        start = time.process_time(); model = timm.create_model(model_name); create.append(time.process_time() - start)
        start = time.process_time(); st.apply(model); apply_.append(time.process_time() - start)
        del model
        start = time.process_time(); model = st.load(path); load.append(time.process_time() - start)
        del model
c = statistics.median(create)
print(json.dumps({"file": st.__file__, "create_s": c, "apply": statistics.median(apply_) / c,
                  "load": statistics.median(load) / c}))
"""


def child(checkout: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
    argv = [sys.executable, "-c", CHILD, args.model, str(args.repeats), str(args.threads)]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    expected = checkout.resolve() / "share_transform" / "__init__.py"
    if Path(result["file"]) != expected:
        raise SystemExit(f"error: the child imported {result['file']}, not {expected}")
    return result


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="a checkout of the revision to compare against")
    parser.add_argument("--head", type=Path, default=Path("."), help="the checkout under test (default: .)")
    parser.add_argument("--model", default="resnet152")
    parser.add_argument("--rounds", type=int, default=6, help="child processes per revision")
    parser.add_argument("--repeats", type=int, default=3, help="create/apply/load repeats in each child")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    revisions = {"base": args.base, "head": args.head}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in revisions}
    for r in range(args.rounds):
        for name in list(revisions) if r % 2 == 0 else reversed(list(revisions)):
            results[name].append(child(revisions[name], args))
    print(f"{args.model}, {args.rounds} rounds x {args.repeats} repeats, {args.threads} thread(s), process CPU time")
    for name in revisions:
        rows = results[name]
        create = [row["create_s"] * 1000 for row in rows]
        print(
            f"{name}: create_model {statistics.median(create):.1f} ms ({min(create):.0f}-{max(create):.0f})   "
            f"apply/create {summary([row['apply'] for row in rows])}   "
            f"load/create {summary([row['load'] for row in rows])}"
        )
    for key in ("apply", "load"):
        head = statistics.median(row[key] for row in results["head"])
        base = statistics.median(row[key] for row in results["base"])
        print(f"{key}: head/base {head / base:.3f}")


if __name__ == "__main__":
    main()
