"""The two kinds of failure every entry point tells apart.

`InputError`: the input cannot be used (a missing, truncated or malformed file, a wrong
config, a forged document that does not even parse). Entry points catch this one base
class and exit 2 with its message, which names the file and the problem. Every module's
own input error (TraceError, BundleError, DataError, ...) derives from it.

`exit_on_input_error` is that catch, used by every entry point.

Anything else is a bug or a failed check and surfaces as such; a verifier's failed cell
is a verdict (exit 1), not an exception.
"""

import contextlib
import sys


class InputError(ValueError):
  """Input that cannot be used; the message names the file (or field) and the problem."""


class ConfigError(InputError):
  """A config that cannot describe a job."""


@contextlib.contextmanager
def exit_on_input_error():
  """The entry points' one handler: malformed input is one line on stderr and exit 2.

  Every loader raises an `InputError` subclass that names the file and the problem; a
  file the OS cannot read (permissions, a directory) is input error too. Nothing the
  entry point would write is written.
  """
  try:
    yield
  except (InputError, OSError) as e:
    message = str(e).replace("\n", " ")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
