"""absl flag parsing with user errors reported as one line.

Unknown config keys, bad values, unknown variants and exceptions inside a
config file reach the user as ``error: ...`` and exit status 2 instead of a
traceback.
"""

from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv):
  """``app.run``'s ``flags_parser``: absl's parser, errors as one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - any parse error is a user error
    # KeyError messages arrive repr-quoted with escaped newlines.
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    lines = [ln.strip(" '\"") for ln in text.splitlines() if ln.strip()]
    if "Traceback" in text:  # an exception inside the config file
      lines = lines[-1:]
    print(f"error: {': '.join(lines) or type(e).__name__}", file=sys.stderr)
    print(
      "see --help; config fields: --config.<section>.<field>=value",
      file=sys.stderr,
    )
    sys.exit(2)
