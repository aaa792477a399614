"""The error of a config value that cannot work (the lowest layer: every module may raise it)."""


class ConfigError(ValueError):
  """A config value that cannot work; the message says which field and what to change."""
