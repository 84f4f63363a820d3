"""Parity with the ORIGINAL PyTorch CDC code (buggyyang/CDC_compression).

Needs torch, einops and ema-pytorch (``pip install -r
requirements-torch.txt``) and the original model code: ``CDC_REF``, the
path of a checkout of the original repository (or of its model code, as in
``../shared/cdc_ref``). When ``CDC_REF`` is unset or empty it defaults to
``../shared/cdc_ref`` next to the repository root, if that folder exists;
otherwise the tests skip, naming ``CDC_REF``::

  python -m pytest tests/test_parity.py -s
  CDC_REF=/path/to/CDC_compression python -m pytest tests/test_parity.py -s

For each family, ``parity_ref.py`` (a subprocess in the original's folder,
with a stub ``lpips``) builds the released configuration with perturbed
LayerNorm/prior parameters, saves it in the released checkpoint format and
computes reference outputs for inputs made here. The checkpoint goes
through ``cdc_jax.convert`` into a model directory
(``cdc_jax.model_dir.load``); our model then recomputes everything: context
model (eval), U-Net, DDIM decodes with an explicit x_T
(``cdc_jax.sample.Sampler``), the first step of the DPM-Solver++(2M)
decode (the original's DDIM update between the solver's first two grid
points, fed the solver's time input), and the training loss
(``cdc_jax.losses.loss_fn``) with the same injected t / rate noise / eps.
Gradients are compared in ``test_parity_grads.py``.
The table of max errors is printed (``-s``) and, when ``PARITY_REPORT``
names a file, appended to it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdc_jax import codec, diffusion, losses, model_dir, samplers
from cdc_jax.convert import infer, torch_checkpoint
from cdc_jax.models.cdc import CDC, from_config
from cdc_jax.sample import Sampler

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CDC_REF = os.path.join(_ROOT, "..", "shared", "cdc_ref")


def _cdc_ref() -> str:
  """$CDC_REF, else ../shared/cdc_ref when it exists, else ''."""
  path = os.environ.get("CDC_REF", "")
  if not path and os.path.isdir(DEFAULT_CDC_REF):
    path = os.path.normpath(DEFAULT_CDC_REF)
  return path


CDC_REF = _cdc_ref()
FOLDER = {"eps": "epsilonparam", "x": "xparam"}
CONTEXT_CHANNELS = {"eps": 3, "x": 64}
LAGRANGIAN = {"eps": 0.9, "x": 0.0032}  # the original test scripts' values
# Image sets: (batch, H, W, DDIM step counts).
SETS = ((2, 64, 64, (2, 3, 5, 17)), (1, 64, 128, (3,)))
GAMMA = 0.8  # x_T = gamma * N(0, I), as the original test scripts
SOLVER, SOLVER_STEPS = "dpmpp2m", 5  # its first step, from t = T-1
# Tolerances (kind, value): "abs" max |a - b|; "rel" max |a - b| / max |b|.
TOL = {
  "y_hat": ("abs", 1e-5),
  "z_hat": ("abs", 0.0),
  "context": ("abs", 1e-5),
  "bpp": ("rel", 1e-5),
  "unet": ("abs", 1e-5),
  "ddim": ("rel", 1e-4),
  "solver": ("rel", 1e-4),
  "loss": ("rel", 1e-5),
  # File payload bits with y's tables chosen exactly (format v3) against
  # by the float32 sigma (v1, v2): a few neighbouring tables at most.
  "scales": ("rel", 1e-3),
}
_STUB_LPIPS = '''"""Stub: imported by the original, unused with rho = 0."""


class LPIPS:
  def __init__(self, *args, **kwargs):
    raise RuntimeError("lpips stub: parity tests run with aux weight 0")
'''


def skip_reason() -> str | None:
  """Why the parity tests cannot run here (None when they can)."""
  for mod in ("torch", "einops", "ema_pytorch"):
    if importlib.util.find_spec(mod) is None:
      return f"{mod} is not installed (pip install -r requirements-torch.txt)"
  if not CDC_REF:
    return (
      "set CDC_REF to a checkout of buggyyang/CDC_compression (the default, "
      f"{os.path.normpath(DEFAULT_CDC_REF)}, does not exist)"
    )
  if not all(os.path.isdir(os.path.join(CDC_REF, f)) for f in FOLDER.values()):
    return f"CDC_REF={CDC_REF} is not a CDC_compression checkout"
  return None


pytestmark = [
  pytest.mark.parity,
  pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
]


# -- inputs and the reference subprocess ---------------------------------------


def _solver_first_step(sched, family: str):
  """abar at the solver's first two grid points (float64 math) and its
  time input there, for parity_ref.py's ``ddim_step``."""
  t = samplers.tables(sched, SOLVER_STEPS, family, SOLVER, np.float64)
  return (1.0 / t.inv_alpha[:2] ** 2).astype(np.float32), t.time[0]


def _make_inputs(family: str, sched, seed: int = 0) -> dict:
  """NCHW float32 inputs for parity_ref.py (all randomness lives here)."""
  timesteps = sched.timesteps
  abar, time = _solver_first_step(sched, family)
  rng = np.random.default_rng(seed)
  f32 = np.float32
  out = {}
  for k, (b, h, w, steps) in enumerate(SETS):
    out[f"images_{k}"] = rng.uniform(-1, 1, (b, 3, h, w)).astype(f32)
    out[f"init_{k}"] = (GAMMA * rng.standard_normal((b, 3, h, w))).astype(f32)
    out[f"steps_{k}"] = np.asarray(steps, np.int64)
    out[f"t_{k}"] = rng.integers(0, timesteps, b).astype(np.int64)
    # What torch.rand_like returns: U[0, 1); the rate noise is this - 0.5.
    out[f"rz_{k}"] = rng.random((b, 256, h // 64, w // 64)).astype(f32)
    out[f"ry_{k}"] = rng.random((b, 256, h // 16, w // 16)).astype(f32)
    out[f"eps_{k}"] = rng.standard_normal((b, 3, h, w)).astype(f32)
    out[f"step_abar_{k}"] = abar
    out[f"step_time_{k}"] = np.full((b, 1), time, f32)
  b, h = 2, 64
  out["unet_x"] = rng.standard_normal((b, 3, h, h)).astype(f32)
  out["unet_time"] = rng.random((b, 1)).astype(f32)
  widths = (CONTEXT_CHANNELS[family], 64, 128, 192)
  for i, c in enumerate(widths):
    s = h // 2**i
    out[f"unet_ctx_{i}"] = rng.standard_normal((b, c, s, s)).astype(f32)
  return out


def run_reference(
  mode: str, family: str, tmp, inputs: dict
) -> tuple[str, dict]:
  """Runs ``parity_ref.py MODE FAMILY ...`` in the original's folder.

  Returns the path of the checkpoint it saved and its outputs.
  """
  stub = tmp / "stubs" / "lpips"
  stub.mkdir(parents=True)
  (stub / "__init__.py").write_text(_STUB_LPIPS)
  folder = os.path.join(CDC_REF, FOLDER[family])
  in_path, out_path = tmp / "inputs.npz", tmp / "reference.npz"
  ckpt = tmp / f"cdc_{family}.pt"
  np.savez(in_path, **inputs)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(tmp / "stubs"), folder])
  env["TQDM_DISABLE"] = "1"
  # One torch thread: with more, a busy machine slows torch down ~15x.
  env.setdefault("OMP_NUM_THREADS", "1")
  script = os.path.join(os.path.dirname(__file__), "parity_ref.py")
  cmd = [sys.executable, script, mode, family, in_path, ckpt, out_path]
  proc = subprocess.run(
    [str(c) for c in cmd],
    cwd=folder,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  if proc.returncode != 0:
    pytest.fail(f"parity_ref.py {mode} {family} failed:\n{proc.stderr[-3000:]}")
  with np.load(out_path) as z:
    return str(ckpt), {k: z[k] for k in z.files}


# -- our side ------------------------------------------------------------------


def nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def _loss_fn(model, family, sched):
  """cdc_jax.losses.loss_fn, jitted, with the original's lambda."""
  sched_arrays = losses.schedule_arrays(sched)
  lam = jnp.float32(LAGRANGIAN[family])

  @jax.jit
  def run(params, x0, t, noise, rate_noise):
    _, aux = losses.loss_fn(
      params, model, sched_arrays, x0, t, noise, rate_noise, lam
    )
    return aux

  return run


class _Table:
  """Rows (group, quantity, kind, error, tolerance, ok) of a comparison."""

  def __init__(self, family: str):
    self.family, self.rows = family, []

  def add(self, group, name, ours, ref, note=""):
    kind, tol = TOL[group]
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    diff = np.abs(ours - ref)
    err = float(diff.max()) if diff.size else 0.0
    if kind == "rel":
      err /= max(float(np.abs(ref).max()), 1e-30)
    self.rows.append((group, name, kind, err, tol, err <= tol, note))

  def failures(self, group):
    return [r for r in self.rows if r[0] == group and not r[5]]

  def render(self) -> str:
    lines = [
      f"parity {self.family}: max errors (rel = relative to max |ref|)",
      f"{'quantity':<28} {'kind':<4} {'max error':>10} {'tol':>8}  ok",
    ]
    for _, name, kind, err, tol, ok, note in self.rows:
      mark = "ok" if ok else "FAIL"
      line = f"{name:<28} {kind:<4} {err:>10.2e} {tol:>8.0e}  {mark}"
      lines.append(line + (f"  {note}" if note else ""))
    return "\n".join(lines)


@pytest.fixture(scope="module", params=["eps", "x"])
def parity(request, tmp_path_factory):
  """Runs both sides for one family; returns the table of errors."""
  family = request.param
  tmp = tmp_path_factory.mktemp(f"parity_{family}")
  dcfg = infer.RELEASE_DIFFUSION[family]
  sched = diffusion.make_schedule(dcfg["schedule"], dcfg["timesteps"])
  inputs = _make_inputs(family, sched)
  t0 = time.perf_counter()
  ckpt, ref = run_reference("forward", family, tmp, inputs)
  t_ref = time.perf_counter() - t0

  conv, _ = torch_checkpoint.convert_file(ckpt, str(tmp / "model"), family)
  loaded = model_dir.load(str(tmp / "model"))
  assert loaded.diffusion_config == infer.RELEASE_DIFFUSION[family]
  model = from_config(loaded.model_config)
  params = jax.device_put(loaded.params)
  sampler = Sampler(model, sched)
  loss_fn = _loss_fn(model, family, sched)
  table = _Table(family)
  cm = codec.load(str(tmp / "model"))
  p = {"params": params}
  denoise = jax.jit(functools.partial(model.apply, method=CDC.denoise))
  context_model = jax.jit(
    functools.partial(model.apply, method=CDC.context_model)
  )

  # U-Net on given x_t, time and context maps.
  ctx_in = [jnp.asarray(nhwc(inputs[f"unet_ctx_{i}"])) for i in range(4)]
  out = denoise(
    p,
    jnp.asarray(nhwc(inputs["unet_x"])),
    jnp.asarray(inputs["unet_time"]),
    ctx_in,
  )
  table.add("unet", "unet(x_t, t, ctx)", out, nhwc(ref["unet_out"]))

  for k, (_, h, w, steps) in enumerate(SETS):
    tag = f"[{k}:{h}x{w}]"
    x = jnp.asarray(nhwc(inputs[f"images_{k}"]))
    res = context_model(p, x)
    for name in ("y_hat", "z_hat"):
      ours, theirs = np.asarray(res[name]), nhwc(ref[f"{name}_{k}"])
      flips = int(np.sum(np.abs(ours - theirs) > 0.5))
      table.add(name, f"{name} {tag}", ours, theirs, f"round flips {flips}")
    for i in range(4):
      table.add(
        "context",
        f"context c{i} {tag}",
        res["context"][i],
        nhwc(ref[f"ctx_{k}_{i}"]),
      )
    table.add("bpp", f"bpp eval {tag}", res["bpp"], ref[f"bpp_{k}"])
    for b in range(x.shape[0]):
      exact, legacy = _payload_bits(cm, x[b : b + 1])
      est = float(ref[f"bpp_{k}"][b])
      note = f"exact {exact / (h * w):.4f} bpp, original's estimate {est:.4f}"
      table.add("scales", f"payload exact/float {tag}{b}", exact, legacy, note)

    init = jnp.asarray(nhwc(inputs[f"init_{k}"]))
    for s in steps:
      rec, bpp = sampler.reconstruct(params, x, init, s)
      ref_rec = nhwc(ref[f"ddim_{k}_{s}"])
      note = f"max|ref| {np.abs(ref_rec).max():.3g}"
      table.add("ddim", f"ddim S={s} {tag}", rec, ref_rec, note)
      table.add("bpp", f"ddim bpp S={s} {tag}", bpp, ref[f"ddim_bpp_{k}_{s}"])
    first = _solver_first(sampler, params, res["context"], init)
    name = f"{SOLVER} step1 S={SOLVER_STEPS} {tag}"
    table.add("solver", name, first, nhwc(ref[f"step_{k}"]))

    t = jnp.asarray(inputs[f"t_{k}"])
    uz = nhwc(inputs[f"rz_{k}"]) - np.float32(0.5)
    uy = nhwc(inputs[f"ry_{k}"]) - np.float32(0.5)
    eps = jnp.asarray(nhwc(inputs[f"eps_{k}"]))
    aux = loss_fn(params, x, t, eps, (jnp.asarray(uz), jnp.asarray(uy)))
    note = f"t={inputs[f't_{k}'].tolist()}"
    ref_bpp = np.mean(ref[f"train_bpp_{k}"].astype(np.float64))
    table.add("loss", f"train mean bpp {tag}", aux["bpp"], ref_bpp, note)
    table.add("loss", f"loss {tag}", aux["loss"], ref[f"loss_{k}"], note)
    table.add("loss", f"extra loss {tag}", aux["extra_loss"], ref[f"extra_{k}"])

  report = table.render()
  report += (
    f"\n(source weights: {conv.source}; reference {t_ref:.1f} s, "
    f"ours {time.perf_counter() - t0 - t_ref:.1f} s)"
  )
  print("\n" + report)
  if os.environ.get("PARITY_REPORT"):
    with open(os.environ["PARITY_REPORT"], "a") as f:
      f.write(report + "\n\n")
  table.source = conv.source
  table.model_dir = str(tmp / "model")
  return table


def _payload_bits(cm, x) -> tuple[int, int]:
  """The range-coded bits of one image with y's tables chosen exactly and
  by the float32 sigma."""
  lat = codec.encode_latents(cm, x)
  _, sigma = cm.hyper(cm.params, jnp.asarray(lat.z_sym))
  bits = []
  for idx in (lat.y_indexes, cm.y_indexes(lat.z_sym, sigma, 1)):
    latents = codec.Latents(lat.z_sym, lat.y_sym, idx, 0.0)
    bits.append(32 * codec.entropy_encode(cm, latents).size)
  return bits[0], bits[1]


def _solver_first(sampler, params, context, x_init):
  """Our loop's first step of the solver's decode from x_init."""
  tables = sampler.tables(SOLVER_STEPS, SOLVER)
  state = samplers.init_state(SOLVER, x_init)
  args = (params, context, state, tables, np.int32(0), np.int32(1))
  return sampler._steps(*args, sampler=SOLVER)[0]


def _check(table: _Table, group: str):
  bad = table.failures(group)
  assert not bad, f"{table.family} {group} out of tolerance:\n" + "\n".join(
    f"  {r[1]}: {r[2]} error {r[3]:.3g} > {r[4]:.0e} {r[6]}" for r in bad
  )


def test_converter_picks_released_weights(parity):
  # The x checkpoint's online weights differ; the EMA ones are the release.
  assert parity.source == ("model" if parity.family == "eps" else "ema")


def test_context_model(parity):
  for group in ("y_hat", "z_hat", "context", "bpp", "scales"):
    _check(parity, group)


def test_unet(parity):
  _check(parity, "unet")


def test_ddim_decode(parity):
  _check(parity, "ddim")


def test_solver_first_step_is_the_originals_ddim_step(parity):
  _check(parity, "solver")


def test_training_loss(parity):
  _check(parity, "loss")


def test_converted_checkpoint_through_codec_cli(parity, tmp_path, capsys):
  # The converted original checkpoint is a model directory the codec CLI
  # takes: an odd-sized photo round-trips to a PNG of its size.
  from PIL import Image
  from skimage import data as skdata

  from cdc_jax.codec import cli

  src = tmp_path / "in.png"
  Image.fromarray(skdata.astronaut()[100:150, 200:270]).save(src)
  cdcj, out = tmp_path / "in.cdcj", tmp_path / "out.png"
  model = parity.model_dir
  assert (
    cli.main(
      ["compress", "--model", model, "--steps", "2", str(src), str(cdcj)]
    )
    == 0
  )
  assert "bpp" in capsys.readouterr().out
  assert cli.main(["decompress", "--model", model, str(cdcj), str(out)]) == 0
  img = np.asarray(Image.open(out))
  assert img.shape == (50, 70, 3) and img.dtype == np.uint8
