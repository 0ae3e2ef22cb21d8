"""The two kinds of failure every entry point tells apart.

`InputError`: the input cannot be used (a missing, truncated or malformed file, a wrong
config, a forged document that does not even parse). Entry points catch this one base
class and exit 2 with its message, which names the file and the problem. Every module's
own input error (TraceError, BundleError, DataError, ...) derives from it.

Anything else is a bug or a failed check and surfaces as such; a verifier's failed cell
is a verdict (exit 1), not an exception.
"""


class InputError(ValueError):
  """Input that cannot be used; the message names the file (or field) and the problem."""


class ConfigError(InputError):
  """A config that cannot describe a job."""
