"""Reference outputs of the ORIGINAL PyTorch CDC code (run by test_parity*).

Runs in a subprocess with the working directory ``$CDC_REF/epsilonparam``
or ``$CDC_REF/xparam`` on ``PYTHONPATH`` (both define a package named
``modules``) plus a stub ``lpips`` package::

  python parity_ref.py {forward|grads|lpips} {eps|x} INPUTS.npz CKPT.pt \
      OUTPUTS.npz [SEED]

It builds the model as the original test scripts do (LPIPS weight 0),
perturbs the LayerNorm and prior parameters so they are not at their
trivial init, saves a checkpoint in the released format and writes the
original's outputs for the inputs (NCHW numpy arrays made by the test) to
OUTPUTS.npz. Randomness inside the original (t, rate noise, eps) is
injected by replacing ``torch.randint`` / ``torch.rand_like`` /
``torch.randn_like``.

``forward`` (test_parity.py): the released configuration. Inputs, per
image set k: ``images_k`` [B,3,H,W] in [-1, 1], ``init_k``
(x_T), ``steps_k`` (DDIM step counts), ``t_k`` [B] (int), ``rz_k`` / ``ry_k``
(what ``rand_like`` returns for z and y: the rate noise plus 0.5),
``eps_k``; and ``unet_x``, ``unet_time`` [B,1], ``unet_ctx_0..3``.
Optional ``step_abar_k`` [2] and ``step_time_k`` [B,1]: one DDIM update
of ``init_k`` from abar[0] to abar[1] (``ddim_step``), as another
sampler's first step.

``lpips`` (test_parity_lpips_loss.py): as ``grads`` with the LPIPS-VGG
term, weight ``rho`` (scalar input), built as the original builds it
(``lpips.LPIPS(net="vgg", eval_mode=False)``) from the real ``lpips``
package (the stub is set aside) with ``pnet_rand=True`` patched in, so
nothing is downloaded: a seeded random VGG16 trunk (biases perturbed) and
the package's v0.1 linear layers. Its dropout draws are injected:
``mask_0..4`` [B, C_i, h_i, w_i] keep-masks replace each
``lins[i].model[0]``. Extra outputs: ``aux`` (the batch mean LPIPS),
``pred`` (the U-Net output) and ``grad_pred`` (the loss's gradient there);
the ``loss_fn_vgg.*`` weights are in the checkpoint, not among the
gradients.

``grads`` (test_parity_grads.py): a model of width ``dim`` with
``context_channels`` and rate weight ``lagrangian`` (scalar inputs), saved
as ``{"step", "model"}``; one training forward of ``images`` with ``t``,
``rz``, ``ry``, ``eps`` injected, then ``loss.backward();
extra_loss.backward()`` as the original trainer does. Outputs ``loss``,
``extra``, ``grad.NAME`` for every named parameter (zeros where torch left
no gradient) and ``no_grad``, the names of those.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import types

import numpy as np
import torch
from modules.denoising_diffusion import GaussianDiffusion
from modules.unet import Unet

LAGRANGIAN = {"eps": 0.9, "x": 0.0032}  # as in the original test scripts


def build(
  family: str,
  dim: int = 64,
  context_channels=None,
  lagrangian=None,
  aux_weight: float = 0.0,
):
  """The model as test_{epsilon,x}param.py construct it (defaults: the
  release; ``dim``, ``context_channels``, ``lagrangian`` and the LPIPS
  weight ``aux_weight`` override)."""
  if lagrangian is None:
    lagrangian = LAGRANGIAN[family]
  if family == "eps":
    from modules.compress_modules import BigCompressor

    ctx = 3 if context_channels is None else context_channels
    unet = Unet(
      dim=dim,
      channels=3,
      context_channels=ctx,
      dim_mults=(1, 2, 3, 4, 5, 6),
      context_dim_mults=(1, 2, 3, 4),
    )
    compressor = BigCompressor(
      dim=dim,
      dim_mults=(1, 2, 3, 4),
      hyper_dims_mults=(4, 4, 4),
      channels=3,
      out_channels=ctx,
      vbr=False,
    )
    return GaussianDiffusion(
      denoise_fn=unet,
      context_fn=compressor,
      num_timesteps=20000,
      loss_type="l1",
      clip_noise="none",
      vbr=False,
      lagrangian=lagrangian,
      pred_mode="noise",
      var_schedule="linear",
      aux_loss_weight=aux_weight,
      aux_loss_type="lpips",
    )
  from modules.compress_modules import ResnetCompressor

  ctx = 64 if context_channels is None else context_channels
  unet = Unet(
    dim=dim,
    channels=3,
    context_channels=ctx,
    dim_mults=[1, 2, 3, 4, 5, 6],
    context_dim_mults=[1, 2, 3, 4],
    embd_type="01",
  )
  compressor = ResnetCompressor(
    dim=dim,
    dim_mults=[1, 2, 3, 4],
    reverse_dim_mults=[4, 3, 2, 1],
    hyper_dims_mults=[4, 4, 4],
    channels=3,
    out_channels=ctx,
  )
  return GaussianDiffusion(
    denoise_fn=unet,
    context_fn=compressor,
    ae_fn=None,
    num_timesteps=8193,
    loss_type="l2",
    lagrangian=lagrangian,
    pred_mode="x",
    aux_loss_weight=aux_weight,
    aux_loss_type="lpips",
    var_schedule="cosine",
    use_loss_weight=True,
    loss_weight_min=5,
    use_aux_loss_weight_schedule=False,
  )


@torch.no_grad()
def perturb(model, gen: torch.Generator) -> None:
  """Non-trivial LayerNorm g/b and prior parameters (seeded)."""
  for name, p in model.named_parameters():
    noise = torch.randn(p.shape, generator=gen)
    if name.endswith(".g"):
      p.copy_(1.0 + 0.2 * noise)
    elif name.endswith(".b"):
      p.copy_(0.2 * noise)
    elif ".prior.a." in name or name.endswith("prior._medians"):
      p.copy_(0.5 * noise)
    elif ".prior.affine." in name and name.endswith(".weight"):
      p.add_(0.3 * noise)


class Injected:
  """Replaces torch's RNG entry points with given tensors, in call order."""

  def __init__(self, t, rand_like, randn_like):
    self.t, self.rand, self.randn = t, list(rand_like), list(randn_like)
    self.saved = {}

  def _randint(self, low, high, size, **kw):
    assert tuple(size) == tuple(self.t.shape) and int(self.t.max()) < high
    return self.t.clone()

  def _pop(self, queue, like):
    a = queue.pop(0)
    assert a.shape == like.shape, (a.shape, like.shape)
    return a.clone()

  def __enter__(self):
    names = ("randint", "rand_like", "randn_like")
    self.saved = {n: getattr(torch, n) for n in names}
    torch.randint = self._randint
    torch.rand_like = lambda x, **kw: self._pop(self.rand, x)
    torch.randn_like = lambda x, **kw: self._pop(self.randn, x)
    return self

  def __exit__(self, *exc):
    for n, f in self.saved.items():
      setattr(torch, n, f)
    if exc[0] is None:
      assert not self.rand and not self.randn, "unused injected noise"


def _perturbed(family, seed, **build_kw):
  """``build(family, **build_kw)`` after seeding torch with ``seed``,
  ``perturb``-ed; returns it and the generator, for further draws."""
  torch.manual_seed(int(seed))
  gen = torch.Generator().manual_seed(int(seed) + 1)
  model = build(family, **build_kw)
  perturb(model, gen)
  return model, gen


def _load_inputs(path):
  """The test's inputs (NCHW) as tensors."""
  return {k: torch.from_numpy(v) for k, v in np.load(path).items()}


def _small(family, inp, seed, aux_weight=0.0):
  """The ``grads``/``lpips`` model: sizes and rate weight from ``inp``."""
  return _perturbed(
    family,
    seed,
    dim=int(inp["dim"]),
    context_channels=int(inp["context_channels"]),
    lagrangian=float(inp["lagrangian"]),
    aux_weight=aux_weight,
  )


def _save_checkpoint(model, path):
  torch.save({"step": 1234, "model": model.state_dict()}, path)


def _train_backward(model, inp):
  """One training forward of ``images`` with t, rate noise and eps
  injected, then the original trainer's (modules/trainer.py) two backward
  passes; returns (loss, extra)."""
  model.train()
  model.zero_grad(set_to_none=True)
  rates = [inp["rz"], inp["ry"]]
  with Injected(inp["t"].long(), rates, [inp["eps"]]):
    loss, extra = model(inp["images"])
  loss.backward()
  extra.backward()
  return loss, extra


def _save_gradients(path, model, out, skip=None):
  """Writes ``out`` plus ``grad.NAME`` of every named parameter (zeros
  where torch left none, those names in ``no_grad``), but those whose
  name starts with ``skip``."""
  no_grad = []
  for name, p in model.named_parameters():
    if skip and name.startswith(skip):
      continue
    if p.grad is None:
      no_grad.append(name)
      out[f"grad.{name}"] = torch.zeros_like(p)
    else:
      out[f"grad.{name}"] = p.grad
  _save(path, out, no_grad=np.asarray(no_grad, dtype=np.str_))


def forward(family, inputs_path, ckpt_path, outputs_path, seed="0"):
  """The released model's outputs (test_parity.py)."""
  model, _ = _perturbed(family, seed)
  if family == "eps":
    _save_checkpoint(model, ckpt_path)
  else:
    from ema_pytorch import EMA

    ema = EMA(model, beta=0.999, update_every=10, power=0.75)
    # The online weights differ from the EMA ones: the converter must pick
    # ema_model.* (as the original x-param test does).
    with torch.no_grad():
      for p in model.parameters():
        p.mul_(0.5)
    state = {"step": 1234, "model": model.state_dict(), "ema": ema.state_dict()}
    torch.save(state, ckpt_path)
    model = ema.ema_model

  inp = _load_inputs(inputs_path)
  out = {}
  n_sets = sum(1 for k in inp if k.startswith("images_"))
  model.eval()
  with torch.no_grad():
    ctx = [inp[f"unet_ctx_{i}"] for i in range(4)]
    out["unet_out"] = model.denoise_fn(inp["unet_x"], inp["unet_time"], ctx)
    for k in range(n_sets):
      images = inp[f"images_{k}"]
      res = model.context_fn(images)
      out[f"y_hat_{k}"] = res["q_latent"]
      out[f"z_hat_{k}"] = res["q_hyper_latent"]
      out[f"bpp_{k}"] = res["bpp"]
      for i, c in enumerate(res["output"]):
        out[f"ctx_{k}_{i}"] = c
      for s in inp[f"steps_{k}"].tolist():
        kw = dict(bpp_return_mean=False, init=inp[f"init_{k}"].clone(), eta=0)
        if family == "eps":
          kw["sample_mode"] = "ddim"
        rec, bpp = model.compress(images, sample_steps=int(s), **kw)
        out[f"ddim_{k}_{s}"], out[f"ddim_bpp_{k}_{s}"] = rec, bpp
      if f"step_abar_{k}" in inp:
        out[f"step_{k}"] = ddim_step(
          model,
          family,
          res["output"],
          inp[f"init_{k}"].clone(),
          inp[f"step_abar_{k}"],
          inp[f"step_time_{k}"],
        )

  model.train()
  with torch.no_grad():
    for k in range(n_sets):
      images, t = inp[f"images_{k}"], inp[f"t_{k}"].long()
      rates = [inp[f"rz_{k}"], inp[f"ry_{k}"]]
      with Injected(t, rates, []):
        out[f"train_bpp_{k}"] = model.context_fn(images)["bpp"]
      with Injected(t, rates, [inp[f"eps_{k}"]]):
        loss, extra = model(images)
      out[f"loss_{k}"], out[f"extra_{k}"] = loss, extra

  _save(outputs_path, out)


def ddim_step(model, family, context, x, abar, time):
  """The original's DDIM update (``model.ddim``, eta 0) of x from
  ``abar[0]`` to ``abar[1]``, its U-Net fed ``time`` in place of its own
  time input. With S = 2 the loop's first step (index 1) reads
  ``train_alphas_cumprod`` at T-1 and 0: those two entries are replaced,
  so the original's own ``set_sample_schedule`` derives every buffer."""
  saved = model.train_alphas_cumprod
  table = saved.clone()
  table[-1], table[0] = abar[0], abar[1]
  model.train_alphas_cumprod = table
  unet = model.denoise_fn
  own = unet.forward
  unet.forward = lambda x, t, context: own(x, time, context=context)
  try:
    model.set_sample_schedule(2, x.device)
    t = torch.full((x.shape[0],), 1, dtype=torch.long)
    clip = True if family == "x" else model.clip_noise
    return model.ddim(x, t, context=context, clip_denoised=clip, eta=0)
  finally:
    model.train_alphas_cumprod = saved
    del unet.forward


def grads(family, inputs_path, ckpt_path, outputs_path, seed="0"):
  """Training-loss gradients of a small model (test_parity_grads.py)."""
  inp = _load_inputs(inputs_path)
  model, _ = _small(family, inp, seed)
  _save_checkpoint(model, ckpt_path)
  loss, extra = _train_backward(model, inp)
  _save_gradients(outputs_path, model, {"loss": loss, "extra": extra})


def _real_lpips():
  """The installed lpips package, imported past run_reference's stub."""
  stub = sys.modules.pop("lpips")
  stub_root = os.path.dirname(os.path.dirname(os.path.abspath(stub.__file__)))
  saved = list(sys.path)
  # The stub's folder is on sys.path ahead of site-packages: drop it here.
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != stub_root]
  try:
    real = importlib.import_module("lpips")
  finally:
    sys.path[:] = saved
  assert real is not stub and hasattr(real, "pretrained_networks")
  return real


class _InjectedMask(torch.nn.Module):
  """Stands in for an lpips nn.Dropout(0.5): given keep-masks, consumed
  batch row by row (the x family calls LPIPS once per image)."""

  def __init__(self, keep):
    super().__init__()
    self.keep, self.used = keep, 0

  def forward(self, d):
    keep = self.keep[self.used : self.used + d.shape[0]]
    assert keep.shape == d.shape, (keep.shape, d.shape)
    self.used += d.shape[0]
    return d * keep * 2.0  # torch Dropout(p=0.5): mask / (1 - p)


def lpips_grads(family, inputs_path, ckpt_path, outputs_path, seed="0"):
  """The rho > 0 training loss and its gradients, dropout injected."""
  inp = _load_inputs(inputs_path)
  real = _real_lpips()
  dd = sys.modules[GaussianDiffusion.__module__]
  # As the original builds it, but with a random trunk: no VGG download.
  patched = functools.partial(real.LPIPS, pnet_rand=True, verbose=False)
  dd.lpips = types.SimpleNamespace(LPIPS=patched)
  model, gen = _small(family, inp, seed, aux_weight=float(inp["rho"]))
  vgg = model.loss_fn_vgg
  with torch.no_grad():  # torchvision inits biases to 0: make them matter
    for name, p in vgg.net.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  _save_checkpoint(model, ckpt_path)

  for i, lin in enumerate(vgg.lins):
    assert isinstance(lin.model[0], torch.nn.Dropout), lin.model
    lin.model[0] = _InjectedMask(inp[f"mask_{i}"])
  seen, preds = [], []
  vgg.register_forward_hook(lambda m, a, out: seen.append(out.reshape(-1)))

  def keep_pred(module, args, out):  # the U-Net output: record its grad
    out.retain_grad()
    preds.append(out)

  model.denoise_fn.register_forward_hook(keep_pred)
  loss, extra = _train_backward(model, inp)
  assert all(lin.model[0].used == len(inp["images"]) for lin in vgg.lins)
  out = {"loss": loss, "extra": extra, "aux": torch.cat(seen).mean()}
  (pred,) = preds
  out["pred"], out["grad_pred"] = pred, pred.grad
  # The frozen LPIPS (loss_fn_vgg.*) is not in the optimizer: not compared.
  _save_gradients(outputs_path, model, out, skip="loss_fn_vgg.")


def _save(path, tensors, **arrays):
  arrays.update(
    {k: np.asarray(v.detach().numpy(), np.float32) for k, v in tensors.items()}
  )
  np.savez(path, **arrays)


if __name__ == "__main__":
  modes = {"forward": forward, "grads": grads, "lpips": lpips_grads}
  modes[sys.argv[1]](*sys.argv[2:])
