"""Warnings for remat that does nothing useful, found by measuring what it saves.

* ``same-as-none``: the policies keep exactly what no remat keeps.
* ``same-as-full``: the policies keep exactly what full remat keeps (a
  policy that was meant to save something saves nothing).
* ``whole-function``: one remat wraps the whole function, so the backward
  pass recomputes everything at once and peak memory does not fall.
* ``untagged-name``: a policy names a `checkpoint_name` that its function
  never tags (JAX accepts it silently and saves nothing for it).
* ``no-remat``: the function has no remat at all.
* ``no-effect``: the compiled gradient's temp memory (on ``target``) is within
  1% of the same gradient without remat, or above it: the compiler kept (or
  merged back) what remat was meant to drop.
* ``offload-costs-memory``: a policy offloads to host memory, yet the compiled
  gradient's device peak (on ``target``) is not below that of keeping the same
  tensors on the device: the offload costs transfers and saves no device memory
  (XLA keeps device copies of what it moves, or stages them). Targets without a
  host memory space (XLA:CPU) offload nothing, so it cannot fire there.
* ``dominated``: a policy that saves something recomputes as many FLOPs as full
  remat (within 5%), or more, while keeping more bytes (a name placed after ``tanh``, whose
  derivative reads the un-named value): full remat is better on both counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from remat_kit import _args, _jax, _jaxpr, targets
from remat_kit.policies import SaveEverything, SaveNothing
from remat_kit.report.compiled import compilation
from remat_kit.report.core import compiled_memory, saved_residuals
from remat_kit.report.explain import policy_names, policy_repr
from remat_kit.report.flops import count_flops, flop_breakdown
from remat_kit.report.peak import peak_of
from remat_kit.report.table import format_bytes
from remat_kit.transforms import with_full_remat, with_offload_on_device, without_remat

__all__ = ["LintWarning", "lint"]


@dataclasses.dataclass(frozen=True)
class LintWarning:
  """One finding: a short code and a message that says what to do.

  Attributes:
    code: the rule, e.g. ``"untagged-name"`` (see :mod:`remat_kit.report.linting`).
    message: what was found and what to do about it.
  """

  code: str
  message: str

  def __str__(self) -> str:
    return f"[{self.code}] {self.message}"


def _kept(fn: Callable[..., Any], args: tuple[Any, ...], nums: tuple[int, ...]
          ) -> list[tuple[Any, ...]]:
  return sorted((r.shape, r.dtype, r.kind) for r in saved_residuals(fn, *args, argnums=nums)
                if r.kind == "activation")


def lint(fn: Callable[..., Any], *args: Any, target: Any = None,
         argnums: int | Sequence[int] = 0, fn_kwargs: Mapping[str, Any] | None = None,
         static_argnames: Sequence[str] = (), **stray: Any) -> list[LintWarning]:
  """Checks the remat in scalar function ``fn`` by what it actually saves.

  Most rules read the jaxpr, the same for every backend; ``no-effect`` and
  ``offload-costs-memory`` compile the gradient for ``target`` (see
  :mod:`remat_kit.targets`; None: the local backend), since whether remat lowers
  memory is the compiler's doing (XLA:CPU merges recomputation back in Python
  loops, for one); the offload rule also compiles the same tensors kept on the
  device.

  Args:
    fn: a scalar function with remat inside it.
    *args: its arguments.
    target: where ``no-effect`` and ``offload-costs-memory`` compile (see
      :mod:`remat_kit.targets`); None for the local backend.
    argnums: the arguments the gradient is taken for (as ``jax.grad``'s).
    fn_kwargs: keyword arguments of ``fn`` (not differentiated).
    static_argnames: those of ``fn_kwargs`` passed as Python values, not traced.

  Returns:
    The warnings found (an empty list when there are none).

  Raises:
    ValueError: for a target :func:`remat_kit.targets.parse_target` refuses,
      or a while loop whose FLOPs cannot be counted.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.ad_checkpoint import checkpoint_name
    >>> def f(x):
    ...   return jnp.sum(jnp.sin(checkpoint_name(jnp.sin(x), "h")))
    >>> pol = jax.checkpoint_policies.save_only_these_names("hh")
    >>> [w.code for w in lint(jax.checkpoint(f, policy=pol), jnp.ones(3))]
    ['whole-function', 'untagged-name', 'same-as-full', 'no-effect']
  """
  call = _args.bind("lint", fn, args, _args.fn_kwargs_of("lint", fn_kwargs, stray),
                    static_argnames, argnums)
  assert call.argnums is not None
  nums = call.argnums
  fn, args = call.fn, call.args  # the user's own function where nothing is static: the
  if call.kwargs:                 # compile memory_report made is then reused
    # The keyword arguments travel as one more positional (traced, not differentiated).
    n, bound = len(call.args), call.fn
    fn, args = (lambda *a: bound(*a[:n], **a[n])), (*call.args, call.kwargs)
  t = targets.parse_target(target)
  closed = jax.make_jaxpr(fn)(*args)
  sites = [e for e in _jaxpr.walk(closed.jaxpr) if _jaxpr.is_remat(e)]
  if not sites:
    return [LintWarning("no-remat", "the function has no remat boundary; wrap its layers in "
                        "`remat_kit.remat` or scan them with `remat_kit.remat_scan`.")]
  out = []
  top = [e for e in closed.jaxpr.eqns if e.primitive.name not in ("name",)]
  forward = count_flops(fn, *args)
  for e in closed.jaxpr.eqns:
    if _jaxpr.is_remat(e) and forward and count_flops(
        lambda *a, e=e: _eval_site(e, a), *[v.aval for v in e.invars]) >= 0.9 * forward:
      out.append(LintWarning(
          "whole-function",
          f"one remat holds {len(top)} of the function's top-level ops and nearly all its "
          "FLOPs: the backward pass recomputes everything at once, so peak memory does not "
          "fall. Rematerialize each layer instead (remat per layer, or `remat_scan`)."))
      break
  policies = [_jaxpr.policy_of(e) for e in sites]
  for e in sites:
    policy = _jaxpr.policy_of(e)
    body, _ = _jaxpr.remat_body(e)
    tagged = {_jax.checkpoint_name_of(x.primitive, x.params) for x in _jaxpr.walk(body)}
    missing = sorted(policy_names(policy) - tagged)
    if missing:
      out.append(LintWarning(
          "untagged-name",
          f"policy {policy_repr(policy)} names {missing}, which its function never tags "
          f"(tags: {sorted(t for t in tagged if t) or 'none'}); JAX saves nothing for them. "
          "Fix the spelling or tag the value with `checkpoint_name`."))
  kept = _kept(fn, args, nums)
  all_none = all(_is_none(p) for p in policies)
  all_full = all(_is_full(p) for p in policies)
  if not all_none and kept == _kept(without_remat(fn), args, nums):
    out.append(LintWarning(
        "same-as-none", "the policies keep exactly what no remat keeps: remat costs compute "
        "here and saves no memory. Use a policy that saves less, or drop remat."))
  elif not all_full and not all_none and kept == _kept(with_full_remat(fn), args, nums):
    out.append(LintWarning(
        "same-as-full", "the policies keep exactly what full remat keeps: nothing they name "
        "or select is saved. Check the names and primitives they refer to, or say "
        "policy='full' to mean it."))
  elif not all_full and not all_none:
    out.extend(_dominated(fn, args, nums, policies))
  if not all_none:
    out.extend(_no_effect(fn, args, nums, t))
    out.extend(_offload_costs_memory(fn, args, nums, t))
  return out


def _dominated(fn: Callable[..., Any], args: tuple[Any, ...], nums: tuple[int, ...],
               policies: list[Any]) -> list[LintWarning]:
  mine = flop_breakdown(fn, *args, argnums=nums)["recompute"]
  full_fn = with_full_remat(fn)
  full = flop_breakdown(full_fn, *args, argnums=nums)["recompute"]
  kept = sum(r.bytes for r in saved_residuals(fn, *args, argnums=nums)
             if r.kind == "activation")
  kept_full = sum(r.bytes for r in saved_residuals(full_fn, *args, argnums=nums)
                  if r.kind == "activation")
  if mine < 0.95 * full or kept <= kept_full:
    return []
  names = sorted(set().union(*(policy_names(p) for p in policies)))
  hint = (f"the names it saves ({names}) are not what the backward pass reads: a name "
          "placed after a nonlinearity (tanh, exp, softmax) saves its output, while the "
          "derivative reads a value computed from the un-named one, so everything is "
          "recomputed anyway. Name the pre-activation (the matmul output) instead, or use "
          "policy='full'." if names else "use policy='full', or save different values.")
  return [LintWarning(
      "dominated",
      f"the policies recompute {mine:,} FLOPs (full remat: {full:,}) while keeping "
      f"{kept:,} bytes of activations (full remat: {kept_full:,}): full remat is cheaper "
      f"in both. {hint[0].upper()}{hint[1:]}")]


def _offload_costs_memory(fn: Callable[..., Any], args: tuple[Any, ...],
                          nums: tuple[int, ...], t: targets.Target) -> list[LintWarning]:
  c = compilation(fn, args, {}, t, argnums=nums, api="lint")
  host = sum(b.size for b in c.buffers if b.memory == "host")
  if not host:
    return []
  mine = peak_of(c, api="lint").peak_bytes
  ref = peak_of(compilation(with_offload_on_device(fn), args, {}, t, argnums=nums, api="lint"),
                api="lint").peak_bytes
  if mine < ref:
    return []
  return [LintWarning(
      "offload-costs-memory",
      f"on {t.name}, the compiled gradient offloads {format_bytes(host)} to host memory, "
      f"yet its device peak is {format_bytes(mine)} against {format_bytes(ref)} when the "
      f"same tensors stay on the device ({100 * (mine - ref) / ref:+.0f}%): the offload "
      "costs host transfers and saves no device memory. Save those tensors on the device "
      "instead (e.g. 'save_dots_no_batch' for 'offload_dots', 'save:NAME' for "
      "'offload:NAME'), or offload fewer, larger tensors.")]


def _no_effect(fn: Callable[..., Any], args: tuple[Any, ...], nums: tuple[int, ...],
               t: targets.Target) -> list[LintWarning]:
  # The function's own compile is the one memory_report and explain_peak share.
  mem = compilation(fn, args, {}, t, argnums=nums, api="lint").memory()
  ref = compiled_memory(jax.grad(without_remat(fn), argnums=nums), *args, target=t,
                        hbm_bytes=False)
  key = "temp_size" if ref.get("temp_size") else "peak_bytes"
  a, b = mem.get(key, 0), ref.get(key, 0)
  if b == 0 or a < 0.99 * b:
    return []
  why = (" XLA:CPU can merge the recomputation back when layers are a Python loop (it "
         "does with the XLA of JAX 0.10): scan them (`remat_scan`), or check on the "
         "accelerator you train on with `target=`."
         if t.is_local and jax.default_backend() == "cpu" else "")
  return [LintWarning(
      "no-effect",
      f"on {t.name}, the compiled gradient's {key.split('_')[0]} memory is "
      f"{a:,} bytes with remat and {b:,} without: remat costs compute and saves no memory "
      f"here.{why}")]


def _is_full(policy: Any) -> bool:
  return policy is None or isinstance(policy, SaveNothing) or getattr(
      policy, "__name__", "") == "nothing_saveable"


def _is_none(policy: Any) -> bool:
  return isinstance(policy, SaveEverything) or getattr(
      policy, "__name__", "") == "everything_saveable"


def _eval_site(eqn: Any, args: Sequence[Any]) -> Any:
  body, consts = _jaxpr.remat_body(eqn)
  return _jaxpr.eval_inlined(body, consts, *args)
