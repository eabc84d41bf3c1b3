"""Errors of the data layer that callers catch without importing TensorFlow."""


class CorruptImageError(RuntimeError):
  """A corrupt or truncated image, with `on_corrupt='error'` (or too many in a row)."""
