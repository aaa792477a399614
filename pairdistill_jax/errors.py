"""The errors users can hit besides bad data files (formats.FormatError): the lowest layer, every module may
raise them, and main says each in one line."""


class ConfigError(ValueError):
  """A config value that cannot work; the message says which field and what to change."""


class NonFiniteLossError(ArithmeticError):
  """Training produced a non-finite loss or gradient; the state of that step was not applied."""
