"""Small helpers the tests share."""

from remat_kit.report import saved_residuals


def activation_bytes(fn, *args, **options):
  """Bytes of the activations ``fn``'s backward pass keeps (arguments excluded), as
  :func:`remat_kit.report.saved_residuals` lists them."""
  return sum(r.bytes for r in saved_residuals(fn, *args, **options) if r.kind == "activation")
