"""absl flag parsing with user errors reported as one line.

Unknown config keys, bad values, unknown variants, a missing config file
and exceptions inside a config file reach the user as ``error: ...`` and
exit status 2 instead of a traceback. An unknown field is named with the
flag that set it and the fields its section has.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

from absl import flags

from cdc_jax import cli_errors

HINT = "see --help; config fields: --config.<section>.<field>=value"


def parse_flags(argv):
  """``app.run``'s ``flags_parser``: absl's parser, errors as one line."""
  try:
    out = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - any parse error is a user error
    _fail(_unknown_field(argv, e) or _message(e))
  problem = _missing_config_file()
  if problem:
    _fail(problem)
  return out


def _fail(message: str):
  status = cli_errors.report(None, message)
  print(HINT, file=sys.stderr)
  sys.exit(status)


def _message(e: Exception) -> str:
  # KeyError messages arrive repr-quoted with escaped newlines.
  text = str(e).replace("\\n", "\n").replace("\\'", "'")
  lines = [ln.strip(" '\"") for ln in text.splitlines() if ln.strip()]
  if "Traceback" in text:  # an exception inside the config file
    lines = [re.sub(r"^\w+(Error|Exception): ", "", lines[-1])]
  return ": ".join(lines) or type(e).__name__


def _config_spec(argv=()) -> str:
  """The --config value: from the parsed flag, else from ``argv``."""
  for arg in argv:
    if arg.startswith("--config="):
      return arg.removeprefix("--config=")
  try:
    return flags.FLAGS["config"].config_filename or ""
  except Exception:  # noqa: BLE001 - unparsed or undefined
    return ""


def _missing_config_file() -> str:
  spec = _config_spec()
  path = spec.partition(":")[0]
  if spec and not os.path.isfile(path):
    return f"--config={spec}: no such config file {path!r}"
  return ""


def _unknown_field(argv, e: Exception) -> str:
  """'--config.train.wibble=3: train has no field 'wibble' (its fields:
  ...)' when ``e`` is a locked config refusing a field ``argv`` sets."""
  if not isinstance(e, KeyError | AttributeError):
    return ""
  key = str(e).strip("'\"\\ ")
  for arg in argv:
    m = re.match(r"--config\.([\w.]+)=", arg)
    if not m or m.group(1).split(".")[-1] != key:
      continue
    section = m.group(1).rpartition(".")[0]
    known = _fields(_config_spec(argv), section)
    where = section or "the config"
    listed = f" (its fields: {', '.join(known)})" if known else ""
    return f"{arg}: {where} has no field {key!r}{listed}"
  return ""


def _fields(config_spec: str, section: str) -> list[str]:
  """The fields of ``section`` ("" for the top) of the config file."""
  path, _, variant = config_spec.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_cdc_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    node = module.get_config(variant or None)
    for part in filter(None, section.split(".")):
      node = node[part]
    return sorted(node.keys())
  except Exception:  # noqa: BLE001 - the listing is a courtesy
    return []
