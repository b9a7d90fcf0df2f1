"""The one exception type that reaches the user as a single line."""


class KilnError(ValueError):
  """Bad input (config, data, files): the message names the problem and the fix."""
