"""Why each residual is kept: remat sites, their policies, and the rule behind a row.

Separate from the report dataclasses (:mod:`remat_kit.report.summary`), so
`lint` and `memory_report` share one explainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from remat_kit import _jax, _jaxpr
from remat_kit.policies import Policy
from remat_kit.report.core import Residual
from remat_kit.report.tensor import KINDS

__all__ = ["RematSite", "jaxpr_remat_sites", "policy_names", "policy_repr", "remat_sites",
           "rule_for"]


def policy_names(policy: Any) -> frozenset[str]:
  """The checkpoint names a policy refers to, where they can be read.

  Args:
    policy: a remat_kit :class:`~remat_kit.policies.Policy`, or one of JAX's
      policies (whose names are read where JAX keeps them; none otherwise).
  """
  if isinstance(policy, Policy):
    return policy.referenced_names()
  return _jax.jax_policy_names(policy)


def policy_repr(policy: Any) -> str:
  """A short readable name of a remat site's policy, for messages.

  Args:
    policy: a policy as a remat site holds it: None (full remat), a function
      (its ``__name__``) or a policy object (its ``repr``).
  """
  if policy is None:
    return "full remat (policy=None)"
  return getattr(policy, "__name__", None) or repr(policy)


@dataclasses.dataclass(frozen=True)
class RematSite:
  """One remat boundary of a traced function.

  Attributes:
    policy: the policy the boundary was traced with (None: full remat).
    names: the `checkpoint_name` tags made inside it.
    layers: the product of the trip counts of the scans around it.
  """

  policy: Any
  names: frozenset[str]
  layers: int  # the product of the trip counts of the scans around it


def remat_sites(fn: Callable[..., Any], args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> list[RematSite]:
  """Every remat boundary in ``fn``, in the order :class:`Residual.site` indexes.

  Args:
    fn: the function to trace.
    args: its positional arguments (arrays or ``jax.ShapeDtypeStruct``s).
    kwargs: its keyword arguments.
  """
  return jaxpr_remat_sites(_jaxpr.closed_parts(jax.make_jaxpr(fn)(*args, **kwargs))[0])


def jaxpr_remat_sites(jaxpr: Any) -> list[RematSite]:
  """:func:`remat_sites` of an already traced jaxpr.

  Args:
    jaxpr: the function's ``Jaxpr`` (a closed jaxpr's ``.jaxpr``).
  """
  return [_site(eqn, layers) for eqn, layers in _jaxpr.remat_equations(jaxpr)]


def _site(eqn: Any, layers: int) -> RematSite:
  body, _ = _jaxpr.remat_body(eqn)
  names = frozenset(n for e in _jaxpr.walk(body)
                    if (n := _jax.checkpoint_name_of(e.primitive, e.params)) is not None)
  return RematSite(_jaxpr.policy_of(eqn), names, layers)


def rule_for(r: Residual, sites: list[RematSite]) -> str:
  """Why ``r`` is kept, from where it was produced (never from its shape).

  Args:
    r: a residual of the gradient.
    sites: the function's remat sites (:func:`remat_sites`), which
      ``r.site`` indexes.

  Returns:
    One line, e.g. "saved by policy ... (name 'h')".
  """
  if r.kind == "argument":
    return "an input: no extra memory"
  if r.kind == "argument cast":
    return "an input cast to another dtype (a copy, not an activation)"
  if r.kind == "constant":
    return "a constant"
  if r.kind != "activation":
    return KINDS.get(r.kind, r.kind)  # not a tensor of the model: say what it is
  carry = r.primitive == "scan carry"
  site = sites[r.site] if r.site is not None and r.site < len(sites) else None
  if site is None or (carry and r.site_role != "input"):
    return ("the scan carry: each layer's input, kept by the scan" if carry
            else "kept by autodiff outside remat")
  if r.site_role == "input":
    return (f"the input of a remat (policy {policy_repr(site.policy)}), kept to recompute "
            "it" + (" (the scan carry, one per layer)" if carry else ""))
  verb = "offloaded" if r.memory == "host" else "saved"
  named = [n for n in r.names if n in policy_names(site.policy)]
  if named:
    return f"{verb} by policy {policy_repr(site.policy)} (name {named[0]!r})"
  return f"{verb} by policy {policy_repr(site.policy)} ({r.primitive})"
