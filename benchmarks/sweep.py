"""Sweep share_transform.plan over timm's and torchvision's ResNet family; print a summary.

Models are built on the meta device (no memory, no init time), so the whole family, the 900 M-parameter
BiT models included, plans in a few minutes on a laptop CPU. A model that gets nothing is listed with
the reason.

    python benchmarks/sweep.py                 # markdown summary on stdout
    python benchmarks/sweep.py --json out.json # and every row as JSON
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import share_transform as st
from share_transform.build import resnet_family


def sweep_one(source: str, name: str) -> dict:
    start = time.perf_counter()
    with torch.device("meta"):
        model = st.build_model(name, source=source)
    try:
        p = st.plan(model)
    except st.ShareError as exc:
        return {"model": f"{source}:{name}", "ok": False, "reason": f"{type(exc).__name__}: {exc}"}
    return {
        "model": f"{source}:{name}",
        "ok": bool(p.groups),
        "reason": "" if p.groups else "no stage has two stride-1 spatial convs of one signature",
        "params_before": p.params_before,
        "params_after": p.params_after,
        "decrease": round(100 * p.decrease, 1),
        "stages": len(p.stages),
        "groups": len(p.groups),
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write every row to this file")
    args = parser.parse_args()
    names = [(source, n) for source in ("timm", "torchvision") for n in resnet_family(source)]
    rows = []
    for source, name in names:
        row = sweep_one(source, name)
        rows.append(row)
        print(json.dumps(row), flush=True)
    shared = [r for r in rows if r["ok"]]
    decreases = sorted(r["decrease"] for r in shared)
    print(
        f"\n{len(shared)}/{len(rows)} models shared; decrease {decreases[0]}% .. {decreases[-1]}% "
        f"(median {decreases[len(decreases) // 2]}%)"
    )
    for r in rows:
        if not r["ok"]:
            print(f"- {r['model']}: {r['reason']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
