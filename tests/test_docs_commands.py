"""Every command README.md and docs/ show runs as written: each
``python -m MODULE ...`` names a module that exists, a subcommand it has,
and only flags its parser defines (config fields of the main job
included). Placeholders (``photo.png``, ``MODEL_DIR``) are not run."""

import argparse
import glob
import importlib
import importlib.util
import os
import re
import shlex

import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(
  os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs/*.md"))
)
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"`([^`\n]*python -m [^`\n]*)`")


def _commands(text: str):
  """The ``python -m ...`` invocations of a Markdown text."""
  found = []
  for block in FENCE.findall(text):
    for line in block.replace("\\\n", " ").splitlines():
      found += [p for p in re.split(r"&&|;", line) if "python -m " in p]
  found += INLINE.findall(text)
  return [c[c.index("python -m ") :].strip() for c in found]


def _cases():
  for doc in DOCS:
    with open(os.path.join(ROOT, doc)) as f:
      for i, cmd in enumerate(_commands(f.read())):
        if not cmd.startswith("python -m pytest"):
          yield pytest.param(doc, cmd, id=f"{doc}:{i}")


def _tokens(cmd: str) -> list[str]:
  """The command's words after ``python -m``, brackets of optional parts
  and shell pipes removed."""
  cmd = re.sub(r"[\[\]]", " ", cmd.split(" | ")[0])
  return [w for w in shlex.split(cmd, comments=True)[2:] if w != "&"]


def _placeholder(word: str) -> bool:
  """``NAME``, ``FILE[:variant]``: a word the reader fills in."""
  return bool(re.fullmatch(r"[A-Z_]+", re.split(r"[.:/=]", word)[-1]))


def _options(parser: argparse.ArgumentParser, words: list[str]):
  """(the flags of ``parser`` or of the subcommand ``words`` name, the
  subcommand or None)."""
  subs = [
    a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
  ]
  if not subs:
    return set(parser._option_string_actions), None
  positional = [w for w in words if not w.startswith("-")]
  assert positional, "no subcommand"
  name = positional[0]
  assert name in subs[0].choices, (
    f"unknown subcommand {name!r}; one of {sorted(subs[0].choices)}"
  )
  return set(subs[0].choices[name]._option_string_actions), name


PARSERS = {  # module -> (module defining it, factory)
  "cdc_jax.codec": ("cdc_jax.codec.cli", "_parser"),
  "cdc_jax.convert": ("cdc_jax.convert.cli", "parser"),
  "cdc_jax.evaluate": ("cdc_jax.evaluate", "parser"),
}


def _parser(module: str) -> argparse.ArgumentParser:
  assert module in PARSERS, f"no check for the CLI {module}"
  where, factory = PARSERS[module]
  return getattr(importlib.import_module(where), factory)()


def _config(spec: str):
  path, _, variant = spec.partition(":")
  assert os.path.isfile(os.path.join(ROOT, path)), f"no config file {path}"
  stem = os.path.splitext(os.path.basename(path))[0]
  return importlib.import_module(f"configs.{stem}").get_config(variant or None)


def _check_main(words: list[str]) -> None:
  import cdc_jax.main  # noqa: F401 - defines the flags

  names = set(flags.FLAGS)
  bools = {n for n in names if isinstance(flags.FLAGS[n].value, bool)}
  spec = [w for w in words if w.startswith("--config=")]
  spec = spec[0].removeprefix("--config=") if spec else ""
  config = None if not spec or _placeholder(spec) else _config(spec)
  for w in (w for w in words if w.startswith("--")):
    name, _, value = w[2:].partition("=")
    if name.startswith("config.") and config is not None:
      node = config
      for part in name.split(".")[1:]:
        assert part in node, f"--{name}: no such config field"
        node = node[part]
    elif name in ("config", "workdir") or name.startswith("config."):
      continue
    elif name == "mode":
      assert value in ("train", "eval", "export", "MODE"), f"--mode={value}"
    else:
      known = name in names or (name[:2] == "no" and name[2:] in bools)
      assert known, f"--{name}: not a flag of cdc_jax.main"


def _check_benchmark(module: str, words: list[str]) -> None:
  path = os.path.join(ROOT, *module.split(".")) + ".py"
  assert os.path.isfile(path), f"no benchmark script {path}"
  with open(path) as f:
    defined = set(re.findall(r"\"(--[a-z0-9][\w-]*)\"", f.read()))
  for w in words:
    if w.startswith("--"):
      assert w.split("=")[0] in defined | {"--help"}, (
        f"{w}: not a flag of {module}"
      )


@pytest.mark.parametrize("doc,cmd", list(_cases()))
def test_documented_command_matches_its_cli(doc, cmd):
  module, *words = _tokens(cmd)
  words = [w.rstrip(",") for w in words]
  if _placeholder(module) or not words:  # a name, not an invocation
    return None
  if module.startswith("benchmarks."):
    return _check_benchmark(module, words)
  assert importlib.util.find_spec(module), f"{cmd}: no module {module}"
  if module == "cdc_jax.main":
    return _check_main(words)
  options, _ = _options(_parser(module), words)
  for w in words:
    if w.startswith("--"):
      assert w.split("=")[0] in options, f"{cmd}: {w} is not a flag"


def test_the_docs_show_commands_of_every_cli():
  shown = {_tokens(c.values[1])[0] for c in _cases()}
  for module in ("cdc_jax.main", "cdc_jax.codec", "cdc_jax.evaluate"):
    assert module in shown
  assert "cdc_jax.convert" in shown
