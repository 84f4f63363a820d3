"""Decode samplers as pure functions: time grids, step tables, updates.

With eta = 0 a decode solves the probability-flow ODE from x_T to x_0.
Write x_t = alpha_t x0 + sigma_t eps (alpha^2 = abar, sigma^2 = 1 - abar)
and lambda_t = log(alpha_t / sigma_t) (half the log-SNR). A sampler is

* a grid of S points from t = T-1 down to t = 0 (the training indices'
  range, fractional for the solver), with the U-Net's time input at each;
* per-step float tables (``tables``, first step first) and an update
  (``step``) that turns the state and the model output at a grid point
  into the state at the next one. The state is a tuple whose first
  element is x_t; the last step goes to sigma = 0 and leaves x_0 there.

Each family turns its model output into an x0 prediction as the
original's decode does: the x family clips it to [-1, 1], the eps family
derives it from eps with the schedule, unclipped.

Samplers (``SAMPLERS``: name -> the id a file header stores):

* ``ddim`` (0): the original's decode (docs/model.md §9), float op for float:
  its index grid ``floor(linspace(0, T-1, S))`` and its time inputs (eps:
  i/S, x: idx_i/T). First order.
* ``dpmpp2m`` (1): DPM-Solver++(2M) (Lu et al. 2022), the multistep
  second-order solver in data-prediction form; it carries the previous
  x0 prediction. Its first step and its last (to sigma = 0, where the
  step in lambda is infinite) are first order, i.e. DDIM steps. The time
  input is t/T for both families, as training saw it. The grid
  (``solver_grid``) is uniform in lambda from -5 to lambda(0); measured
  against a uniform-lambda grid from lambda(T-1), a time-quadratic and a
  time-uniform grid, it is the best from S = 16 on:
  - Gaussian data, exact denoiser (tests/test_samplers.py), cosine
    schedule, RMS error at S = 8 / 16 / 32 / 64: 2.6e-3 / 4.1e-3 /
    1.2e-3 / 3.0e-4 (from lambda(T-1): 2.5e-2 / 5.6e-3 / 2.9e-3 /
    7.7e-4; quadratic 3.6e-2 / 9.9e-3 / 1.9e-3 / 3.8e-4; DDIM 5.9e-2 /
    3.2e-2 / 1.6e-2 / 8.4e-3);
  - a trained tiny x model (configs/x_cosine.py:tiny, the original
    objective), one 256x256 photo, PSNR against the solver's S = 1000
    decode on the grid from lambda(T-1) (63 dB from its S = 1000 decode
    on the time-uniform grid, 44 dB from DDIM's S = 1000 decode) at S =
    8 / 16 / 32 / 65: 33.9 / 44.9 / 55.7 / 69.7 dB (from
    lambda(T-1): 29.8 / 37.3 / 49.1 / 59.5; quadratic 35.1 / 41.5 / 49.4
    / 58.4; time-uniform 35.6 / 38.1 / 41.9 / 45.7; DDIM 26.9 / 28.6 /
    30.5 / 32.7). Making the step before the last first order too
    (``LOWER_ORDER_FINAL``) cost 1-3 dB there.

A distilled student (``cdc_jax.distill``) decodes with its own sampler,
``student_sampler(parameterisation)``, never named in a file: DDIM steps
on every (base S / S)-th point of its teacher's DDIM grid of base S
(``Student``, recorded in its model.json), with the time inputs the
teacher's DDIM decode gives those points, and its output read in its
parameterisation (``distill_target.from_output``, unclipped).

Everything a decode does follows from (sampler, S, schedule, family).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from cdc_jax import diffusion, distill_target

SAMPLERS = {"ddim": 0, "dpmpp2m": 1}  # name -> id in a file header
DEFAULT_SAMPLER = "ddim"
TITLES = {"ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)"}  # for reports
SOLVER_GRID = "logsnr"  # the solver's grid (see solver_grid)
# Below this lambda alpha_t < 0.007: x_t is noise, whatever x0. The cosine
# schedule starts at lambda(T-1) = -12.0 (its last beta is clipped); a
# grid uniform from there spends a third of its points where the x0
# prediction hardly changes. The first step runs from lambda(T-1) to one
# grid step above -5 at any S; over the part below -5 its error is at most
# alpha (< 0.007) times the change of the x0 prediction there (the
# trained tiny x model at S = 65: 70 dB from the S = 1000 decode on the
# grid from lambda(T-1)). The linear schedule starts at -5.03.
LAMBDA_MIN = -5.0
LOWER_ORDER_FINAL = False  # see dpm_tables
GRIDS = ("logsnr", "quadratic", "time")


def sampler_id(name: str) -> int:
  """The header id of sampler ``name``; ValueError if unknown."""
  if name not in SAMPLERS:
    known = ", ".join(SAMPLERS)
    raise ValueError(f"unknown sampler {name!r}; use one of {known}")
  return SAMPLERS[name]


def sampler_name(sid: int) -> str:
  """The sampler of header id ``sid``; ValueError if unknown."""
  for name, i in SAMPLERS.items():
    if i == sid:
      return name
  known = ", ".join(f"{i} {n}" for n, i in SAMPLERS.items())
  raise ValueError(f"unknown sampler id {sid!r} ({known})")


# -- DDIM (eta = 0) -----------------------------------------------------------


def sample_indices(timesteps: int, steps: int, family: str) -> np.ndarray:
  """Training indices visited by an S-step DDIM decode (docs/model.md §9.1).

  ``floor(linspace(0, T-1, S))``; the x family special-cases S = 1 to
  [T-1]. The original truncates a float32 torch linspace; for the S values
  listed in docs/model.md §9.1 the indices are identical.
  """
  if steps < 1:
    raise ValueError(f"decode steps must be >= 1, got {steps}")
  if family == "x" and steps == 1:
    return np.array([timesteps - 1], dtype=np.int64)
  lin = np.linspace(0, timesteps - 1, steps, dtype=np.float32)
  return lin.astype(np.int64)


class DDIMTables(NamedTuple):
  """Per-step float32 arrays of an S-step DDIM decode (``ddim_tables``:
  the index i = 0..S-1 of docs/model.md §9.1; ``tables``: first step
  first)."""

  abar: np.ndarray
  abar_prev: np.ndarray
  time: np.ndarray  # the U-Net's time input at step i


def ddim_tables(
  schedule: diffusion.Schedule, steps: int, family: str
) -> DDIMTables:
  """eps: time i/S; x: time idx_i/T (the original's quirk,
  docs/model.md §9.2)."""
  idx = sample_indices(schedule.timesteps, steps, family)
  abar = schedule.alphas_cumprod[idx].astype(np.float32)
  abar_prev = np.concatenate([[1.0], abar[:-1]]).astype(np.float32)
  if family == "eps":
    time = np.arange(steps, dtype=np.float32) / np.float32(steps)
  elif family == "x":
    time = idx.astype(np.float32) / np.float32(schedule.timesteps)
  else:
    raise ValueError(f"unknown family {family!r}")
  return DDIMTables(abar, abar_prev, time.astype(np.float32))


def ddim_step(x, model_out, abar, abar_prev, family: str):
  """One deterministic DDIM update (eta = 0) from x at a step to the next.

  eps family: model_out is eps-hat, x0-hat is not clipped. x family:
  model_out is x0-hat, clipped to [-1, 1], and eps-hat re-derived from it;
  the radicand is clamped at 0.
  """
  if family == "eps":
    eps = model_out
    x0 = diffusion.x0_from_eps(x, abar, eps)
    coef = jnp.sqrt(1.0 - abar_prev)
  else:
    x0 = jnp.clip(model_out, -1.0, 1.0)
    eps = diffusion.eps_from_x0(x, abar, x0)
    coef = jnp.sqrt(jnp.maximum(1.0 - abar_prev, 0.0))
  return jnp.sqrt(abar_prev) * x0 + coef * eps


# -- DPM-Solver++(2M) ---------------------------------------------------------


def half_log_snr(schedule: diffusion.Schedule) -> np.ndarray:
  """lambda at each training index, float64 (from the float32 SNR, which
  keeps its precision where 1 - abar does not)."""
  return 0.5 * np.log(schedule.snr.astype(np.float64))


def solver_grid(
  schedule: diffusion.Schedule, steps: int, kind: str = SOLVER_GRID
) -> np.ndarray:
  """S fractional training indices from T-1 down to 0 (float64).

  ``kind``: "logsnr", uniform in lambda from max(lambda(T-1),
  ``LAMBDA_MIN``) to lambda(0), lambda(t) linear between integer t, and
  the first point moved to T-1; "quadratic", t = (T-1) u^2 for uniform u;
  "time", uniform in t. S = 1 is [T-1] (one x0 prediction from x_T).
  """
  if steps < 1:
    raise ValueError(f"decode steps must be >= 1, got {steps}")
  last = schedule.timesteps - 1
  u = np.linspace(1.0, 0.0, steps) if steps > 1 else np.ones(1)
  if kind == "time":
    return last * u
  if kind == "quadratic":
    return last * u**2
  if kind != "logsnr":
    raise ValueError(f"unknown grid {kind!r}; use one of {', '.join(GRIDS)}")
  lam = half_log_snr(schedule)
  low = max(lam[-1], LAMBDA_MIN)
  target = low + (1.0 - u) * (lam[0] - low)
  # lambda decreases with t: interpolate on the reversed (increasing) table.
  t = np.interp(target, lam[::-1], np.arange(last, -1, -1.0))
  t[0] = last
  return t


class DPMTables(NamedTuple):
  """Per-step arrays of a DPM-Solver++(2M) decode, first step first.

  At step j from grid point s to the next point t (sigma = 0 after the
  last): x0 = clip(out) (x) or inv_alpha x - noise_ratio out (eps); D =
  x0 + slope (x0 - x0 of the step before); x_t = x_coef x_s + x0_coef D.
  """

  time: np.ndarray  # the U-Net's time input t_s / T
  inv_alpha: np.ndarray  # 1 / alpha_s
  noise_ratio: np.ndarray  # sigma_s / alpha_s
  x_coef: np.ndarray  # sigma_t / sigma_s
  x0_coef: np.ndarray  # alpha_t (1 - exp(-h)), h = lambda_t - lambda_s
  slope: np.ndarray  # h / (2 h_prev): 0 at first-order steps


def dpm_tables(
  schedule: diffusion.Schedule,
  steps: int,
  grid: str = SOLVER_GRID,
  lower_order_final: bool = False,
  dtype=np.float32,
) -> DPMTables:
  """The solver's tables on ``solver_grid(schedule, steps, grid)``,
  computed in float64 and stored as ``dtype``. The first and the last
  step are first order; ``lower_order_final`` makes the one before the
  last first order too (DPM-Solver's option for few steps)."""
  t = solver_grid(schedule, steps, grid)
  lam_table = half_log_snr(schedule)
  lam = np.interp(t, np.arange(schedule.timesteps), lam_table)
  alpha = np.sqrt(1.0 / (1.0 + np.exp(-2.0 * lam)))
  sigma = np.sqrt(1.0 / (1.0 + np.exp(2.0 * lam)))
  h = np.append(np.diff(lam), np.inf)
  x_coef = np.append(sigma[1:] / sigma[:-1], 0.0)
  x0_coef = np.append(alpha[1:] * -np.expm1(-h[:-1]), 1.0)
  slope = np.zeros(steps)
  slope[1:-1] = h[1:-1] / (2.0 * h[:-2])
  if lower_order_final and steps > 2:
    slope[-2] = 0.0
  cast = lambda a: np.asarray(a, dtype)
  return DPMTables(
    cast(t / schedule.timesteps),
    cast(1.0 / alpha),
    cast(np.exp(-lam)),
    cast(x_coef),
    cast(x0_coef),
    cast(slope),
  )


def dpm_x0(x, model_out, inv_alpha, noise_ratio, family: str):
  """The family's x0 prediction at a grid point (x clipped, eps not)."""
  if family == "eps":
    return inv_alpha * x - noise_ratio * model_out
  return jnp.clip(model_out, -1.0, 1.0)


def dpmpp2m_step(state, model_out, row: DPMTables, family: str):
  """One DPM-Solver++(2M) step: (x_s, x0 before) -> (x_t, x0 at s)."""
  x, x0_prev = state
  x0 = dpm_x0(x, model_out, row.inv_alpha, row.noise_ratio, family)
  d = x0 + row.slope * (x0 - x0_prev)
  return row.x_coef * x + row.x0_coef * d, x0


# -- distilled students --------------------------------------------------------

STUDENT_PREFIX = "student:"  # + parameterisation: a student's sampler name


class Student(NamedTuple):
  """How a distilled student decodes (model.json's ``distilled``)."""

  base_steps: int  # its first teacher's DDIM grid
  steps: int  # S; base_steps // steps is a power of two
  parameterisation: str  # one of distill_target.PARAMETERISATIONS


class StudentTables(NamedTuple):
  """Per-step float32 arrays of a student's decode, first step first."""

  abar: np.ndarray
  abar_next: np.ndarray  # 1 after the last step
  time: np.ndarray  # the teacher's DDIM time input at the point


def student_sampler(parameterisation: str) -> str:
  return STUDENT_PREFIX + parameterisation


def student_positions(base_steps: int, steps: int) -> np.ndarray:
  """Points of the base DDIM grid (0 = the least noisy, i of
  docs/model.md §9.1) an S-step student visits, first step first: every
  stride-th from the top, stride = base_steps / steps, so each halving
  keeps every other point of the grid before it."""
  if steps < 1 or base_steps % steps:
    raise ValueError(f"{steps} student steps do not divide {base_steps}")
  stride = base_steps // steps
  return np.arange(steps - 1, -1, -1) * stride + stride - 1


def student_tables(
  schedule: diffusion.Schedule, family: str, student: Student
) -> StudentTables:
  base = ddim_tables(schedule, student.base_steps, family)
  pos = student_positions(student.base_steps, student.steps)
  abar = base.abar[pos]
  abar_next = np.append(abar[1:], np.float32(1.0)).astype(np.float32)
  return StudentTables(abar, abar_next, base.time[pos])


def student_step(x, model_out, row, parameterisation: str):
  """One DDIM step with the x0 the student's output means (unclipped:
  the distillation target is the x0 that reproduces the teacher)."""
  x0 = distill_target.from_output(x, model_out, row.abar, parameterisation)
  return distill_target.ddim_from_x0(x, x0, row.abar, row.abar_next)


# -- one interface for the loops ----------------------------------------------


def tables(
  schedule: diffusion.Schedule,
  steps: int,
  family: str,
  sampler: str,
  dtype=np.float32,
  student: Student | None = None,
):
  """``sampler``'s step tables for S = ``steps``, first step first: a
  NamedTuple of [S] ``dtype`` arrays with a ``time`` field, the U-Net's
  time input (DDIM's come from float32 schedule arrays, the solver's
  from float64 math). A student's sampler needs ``student`` (its
  ``Student``; ``steps`` must be its S). ValueError for an unknown
  sampler or family."""
  if family not in ("eps", "x"):
    raise ValueError(f"unknown family {family!r}")
  if sampler.startswith(STUDENT_PREFIX):
    if student is None or steps != student.steps:
      raise ValueError(f"{sampler}: a student decodes with its own S")
    return StudentTables(
      *(np.asarray(a, dtype) for a in student_tables(schedule, family, student))
    )
  sampler_id(sampler)
  if sampler == "ddim":
    t = ddim_tables(schedule, steps, family)
    return DDIMTables(*(np.asarray(a[::-1], dtype) for a in t))
  return dpm_tables(schedule, steps, SOLVER_GRID, LOWER_ORDER_FINAL, dtype)


def init_state(sampler: str, x_init) -> tuple:
  """The loop state at x_T: (x,) for DDIM and students; (x, x0 before)
  for the solver (zeros: its first step does not read them)."""
  if sampler != "dpmpp2m":
    return (x_init,)
  return (x_init, jnp.zeros_like(x_init))


def step(sampler: str, family: str, state: tuple, model_out, row) -> tuple:
  """One step of ``sampler`` (``row``: its tables at this step)."""
  if sampler == "ddim":
    (x,) = state
    return (ddim_step(x, model_out, row.abar, row.abar_prev, family),)
  if sampler.startswith(STUDENT_PREFIX):
    (x,) = state
    param = sampler[len(STUDENT_PREFIX) :]
    return (student_step(x, model_out, row, param),)
  return dpmpp2m_step(state, model_out, row, family)
