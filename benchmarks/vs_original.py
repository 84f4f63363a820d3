"""Speed of the original PyTorch CDC beside cdc_jax, same machine, one run.

  python -m benchmarks.vs_original                      # eps and x, 768x512
  python -m benchmarks.vs_original --families x --size 256x256 --no-train
  CDC_REF=/path/to/CDC_compression python -m benchmarks.vs_original \
      --solver-steps eps=16,x=16 --out /tmp/vs_original.json

Both released architectures (random weights: speed does not depend on
them). The original is imported at run time from ``CDC_REF`` (default
``../shared/cdc_ref``) and built as ``tests/parity_ref.py`` builds it;
nothing of it is copied here. Each measurement runs in its own child
process (one framework, one model in memory at a time); torch and XLA
both use every core. cdc_jax runs on JAX's default backend; the original
on ``--torch-device`` (``cuda`` on a GPU machine, with torch's CUDA
build beside JAX's).

Decode: one image of ``--size`` through the whole ``compress``-style
forward (g_a, h_a, h_s, g_s and the DDIM loop, the original's
``GaussianDiffusion.compress`` with eta = 0; ours
``cdc_jax.sample.Sampler.reconstruct``), timed at S = 1 and S = 3 after
a warm-up (and, for cdc_jax, after the compile of each S): a step costs
(t3 - t1) / 2, the rest t1 minus a step. The full decode at each
family's default S (200 eps, 65 x) and at the solver's S (dpmpp2m costs
one U-Net pass per step, as DDIM) is the fixed part plus S steps.
cdc_jax runs in float32 and in bfloat16 (``models.cdc.with_dtype``).

Train step: batch ``--train-batch`` of ``--train-crop`` crops: the
original's forward, its two backward passes (as its trainer) and an Adam
step; ours ``python -m benchmarks.train_step --json`` (the jitted step of
the main job), float32. Median over ``--train-steps`` after a warm-up.

Prints a table (seconds and the ratio original / cdc_jax) and writes
``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CDC_REF = os.path.join(ROOT, "..", "shared", "cdc_ref")
FOLDER = {"eps": "epsilonparam", "x": "xparam"}
CONFIG = {"eps": "configs/eps_linear.py", "x": "configs/x_cosine.py"}
DEFAULT_S = {"eps": 200, "x": 65}
GAMMA = 0.8
STUB_LPIPS = (
  "class LPIPS:\n  def __init__(self, *a, **k):\n"
  "    raise RuntimeError('lpips stub: the benchmark runs with rho = 0')\n"
)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--families", default="eps,x")
  p.add_argument("--size", default="768x512", help="decode W x H")
  p.add_argument(
    "--solver-steps", default="eps=16,x=16", help="the solver's S per family"
  )
  p.add_argument("--repeats", type=int, default=2, help="timed decodes per S")
  p.add_argument("--train-batch", type=int, default=4)
  p.add_argument("--train-crop", type=int, default=256)
  p.add_argument("--train-steps", type=int, default=3)
  p.add_argument("--no-train", action="store_true", help="decode only")
  p.add_argument(
    "--torch-device", default="cpu", help="the original's device (cuda)"
  )
  p.add_argument("--out", default="/tmp/cdc_vs_original.json")
  p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def cdc_ref() -> str:
  path = os.environ.get("CDC_REF") or os.path.normpath(DEFAULT_CDC_REF)
  if not all(os.path.isdir(os.path.join(path, f)) for f in FOLDER.values()):
    raise SystemExit(
      f"CDC_REF={path} is not a CDC_compression checkout (its epsilonparam/ "
      "and xparam/ folders); set CDC_REF"
    )
  return path


def split(t1: float, t3: float) -> dict:
  """Per-step and fixed seconds from decodes at S = 1 and S = 3."""
  step = (t3 - t1) / 2
  return {"step_s": step, "fixed_s": t1 - step, "t1_s": t1, "t3_s": t3}


def timed(fn, repeats: int, sync=lambda: None) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


# -- the original (child) ------------------------------------------------------


def original(family: str, args) -> dict:
  import torch

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  import parity_ref  # tests/: builds the original as its test scripts do

  dev = torch.device(args.torch_device)
  model = parity_ref.build(family).to(dev)
  model.eval()
  w, h = (int(v) for v in args.size.split("x"))
  images = (torch.rand(1, 3, h, w) * 2 - 1).to(dev)
  init = (GAMMA * torch.randn(1, 3, h, w)).to(dev)
  sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
  kw = dict(bpp_return_mean=False, eta=0)
  if family == "eps":
    kw["sample_mode"] = "ddim"

  def decode(steps):
    with torch.no_grad():
      model.compress(images, sample_steps=steps, init=init.clone(), **kw)

  decode(1)  # warm-up
  out = split(
    timed(lambda: decode(1), args.repeats, sync),
    timed(lambda: decode(3), args.repeats, sync),
  )
  out["threads"] = torch.get_num_threads()
  out["device"] = str(dev)
  if not args.no_train:
    out["train_step_s"] = original_train_step(model, args, dev, sync)
  return out


def original_train_step(model, args, dev, sync) -> float:
  import torch

  model.train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-4)
  c = args.train_crop
  batch = (torch.rand(args.train_batch, 3, c, c) * 2 - 1).to(dev)

  def step():
    opt.zero_grad(set_to_none=True)
    loss, extra = model(batch)
    loss.backward()
    extra.backward()
    opt.step()

  step()  # warm-up
  return timed(step, args.train_steps, sync)


# -- cdc_jax (child) -----------------------------------------------------------


def ours(family: str, dtype: str, args) -> dict:
  import jax
  import numpy as np

  from cdc_jax import diffusion, testing
  from cdc_jax.models.cdc import from_config, with_dtype
  from cdc_jax.sample import Sampler, initial_noise
  from configs import common

  config = common.load_config(CONFIG[family])
  model = from_config(config.model)
  params = testing.random_params(model)
  model = with_dtype(model, dtype)
  dc = config.diffusion
  sampler = Sampler(model, diffusion.make_schedule(dc.schedule, dc.timesteps))
  w, h = (int(v) for v in args.size.split("x"))
  rng = np.random.default_rng(0)
  x = jax.numpy.asarray(rng.uniform(-1, 1, (1, h, w, 3)).astype(np.float32))
  x_init = initial_noise(0, (1, h, w, 3), GAMMA)
  compile_s = {}

  def decode(steps):
    jax.block_until_ready(sampler.reconstruct(params, x, x_init, steps))

  for steps in (1, 3):
    t = time.perf_counter()
    decode(steps)  # the compile of this S, and a warm-up
    compile_s[steps] = time.perf_counter() - t
  t1 = timed(lambda: decode(1), args.repeats)
  out = split(t1, timed(lambda: decode(3), args.repeats))
  out["first_call_s"] = compile_s
  out["devices"] = str(jax.devices()[0].device_kind)
  return out


def ours_train_step(family: str, args) -> float:
  cmd = [sys.executable, "-m", "benchmarks.train_step"]
  cmd += ["--json", "--config", CONFIG[family], "--dtype", "float32"]
  cmd += ["--batch", str(args.train_batch), "--crop", str(args.train_crop)]
  cmd += ["--steps", str(args.train_steps)]
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  if res.returncode:
    raise SystemExit(f"train_step.py failed:\n{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])["step_s"]


# -- the parent ----------------------------------------------------------------


def child(what: str, family: str, dtype: str, argv, ref: str) -> dict:
  """Runs one measurement in a fresh process; its JSON line."""
  env = dict(os.environ, TQDM_DISABLE="1")
  cmd = [sys.executable, "-m", "benchmarks.vs_original", *argv]
  cmd += ["--child", what, family, dtype]
  cwd = ROOT
  with tempfile.TemporaryDirectory() as tmp:
    if what == "original":
      os.makedirs(os.path.join(tmp, "lpips"))
      with open(os.path.join(tmp, "lpips", "__init__.py"), "w") as f:
        f.write(STUB_LPIPS)
      # The original imports its own tree by its own names (``modules``,
      # ``config``): its folder is the working directory and comes first,
      # after the lpips stub; this repository (for ``-m``) comes last.
      cwd = os.path.join(ref, FOLDER[family])
      paths = [tmp, cwd, os.path.join(ROOT, "tests"), ROOT]
      env["PYTHONPATH"] = os.pathsep.join(paths)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
  if res.returncode:
    raise SystemExit(f"{what} {family} {dtype} failed:\n{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def full_decode(r: dict, steps: int) -> float:
  return r["fixed_s"] + steps * r["step_s"]


def table(results: dict, solver: dict, train: bool) -> str:
  cols = ("original", "f32", "bf16", "orig/f32", "orig/bf16")
  lines = [f"{'':<34} " + " ".join(f"{c:>9}" for c in cols)]

  def row(name, o, a, b):
    ra = o / a if a else float("nan")
    rb = "" if b is None else f"{o / b:>9.2f}"
    bs = "" if b is None else f"{b:>9.2f}"
    lines.append(f"{name:<34} {o:>9.2f} {a:>9.2f} {bs:>9} {ra:>9.2f} {rb:>9}")

  for fam, r in results.items():
    o, a, b = r["original"], r["float32"], r["bfloat16"]
    row(f"{fam}: decode step (s)", o["step_s"], a["step_s"], b["step_s"])
    for label, s in (("default", DEFAULT_S[fam]), ("solver", solver[fam])):
      row(
        f"{fam}: decode at S={s} ({label}) (s)",
        full_decode(o, s),
        full_decode(a, s),
        full_decode(b, s),
      )
    if train:
      row(f"{fam}: train step (s)", o["train_step_s"], r["train_step_s"], None)
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.child:
    what, family, dtype = args.child
    r = (
      original(family, args)
      if what == "original"
      else ours(family, dtype, args)
    )
    print(json.dumps(r))
    return 0
  ref = cdc_ref()
  solver = dict(kv.split("=") for kv in args.solver_steps.split(","))
  solver = {k: int(v) for k, v in solver.items()}
  families = args.families.split(",")
  print(
    f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {args.size}, "
    f"CDC_REF={ref}",
    flush=True,
  )
  results = {}
  for fam in families:
    r = {"original": child("original", fam, "float32", argv, ref)}
    print(f"{fam} original: {r['original']}", flush=True)
    for dtype in ("float32", "bfloat16"):
      r[dtype] = child("ours", fam, dtype, argv, ref)
      print(f"{fam} cdc_jax {dtype}: {r[dtype]}", flush=True)
    if not args.no_train:
      r["train_step_s"] = ours_train_step(fam, args)
      print(f"{fam} cdc_jax train step: {r['train_step_s']:.2f} s", flush=True)
    results[fam] = r
  print(table(results, solver, not args.no_train))
  report = {
    "size": args.size,
    "cpus": os.cpu_count(),
    "solver_steps": solver,
    "default_steps": DEFAULT_S,
    "train": None
    if args.no_train
    else {"batch": args.train_batch, "crop": args.train_crop},
    "results": results,
  }
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
