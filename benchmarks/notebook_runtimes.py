"""Wall time of each notebook at its default parameters, executed as in the tests (a real Jupyter
kernel through `tests/notebook_runner.run_notebook`), with an empty JAX compile cache.

  .venv/bin/python -m benchmarks.notebook_runtimes [--only NAME ...] [--out DIR]

Only the output folder is set (and, for `zero_shot_detection.ipynb`, `WEIGHTS`: a tiny
random-weight CLIP checkpoint directory written here, since this machine cannot reach OpenAI's
server: the figure is the notebook's own work at RegionCLIP's 800 / 1333 resize, not RN50's).
The figures go to notebooks/README.md and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = {
    "zero_shot_detection.ipynb": "WORKDIR",
    "shapesworld_method.ipynb": "OUT_DIR",
    "ovd_finetune_coco.ipynb": "OUT_DIR",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(NOTEBOOKS), default=sorted(NOTEBOOKS))
    parser.add_argument("--out", default=None, help="work folder (default: a new temp folder)")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="notebook_runtimes_"))
    out.mkdir(parents=True, exist_ok=True)
    # Before JAX is imported anywhere (the kernels inherit the environment): a fresh cache.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(out / "jax_cache")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO / "tests"))
    from notebook_runner import run_notebook

    results = {}
    for name in args.only:
        work = out / name.removesuffix(".ipynb")
        work.mkdir(exist_ok=True)
        params = {NOTEBOOKS[name]: str(work / "out")}
        if name == "zero_shot_detection.ipynb":
            from regionclip_jax.inference.random_model import random_checkpoint

            params["WEIGHTS"] = str(random_checkpoint(str(work / "tiny_clip")))
        start = time.perf_counter()
        run_notebook(name, params, work, timeout=3600)
        results[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {results[name]:.1f} s", flush=True)
    print(json.dumps({"seconds": results, "cpus": os.cpu_count(), "out": str(out)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
