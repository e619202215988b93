"""Assertions for your own tests: remat changes memory and nothing else.

Use them in pytest, like ``chex`` assertions (the pytest plugin,
``pytest_remat_kit``, adds a ``remat_impl`` fixture and the
``--remat-update-fingerprints`` option):

* :func:`assert_remat_equivalent`: each policy gives the same outputs,
  gradients, parameters and dropout masks as no remat, with and without jit,
  under both remat implementations.
* :func:`assert_saves`: the gradient keeps exactly (or at least) the named
  residuals, and at most so many bytes.
* :func:`fingerprint` / :func:`assert_fingerprint`: what the gradient saves,
  pinned in a JSON file; a JAX upgrade that changes it fails with a diff.
* :func:`assert_recompute_deterministic`: the values the backward pass
  recomputes equal the forward's, bit for bit.

Example:
  >>> import jax.numpy as jnp, remat_kit as rk
  >>> from remat_kit import testing as rkt
  >>> def loss(w, x):
  ...   h = rk.checkpoint_name(jnp.sin(x @ w), "h")
  ...   return jnp.sum(h @ w)
  >>> w, x = jnp.ones((4, 4)), jnp.ones((2, 4))
  >>> rkt.assert_remat_equivalent(loss, w, x, policies=["full", "save:h"])
  >>> rkt.assert_saves(rk.remat(loss, policy="save:h"), w, x, names=["h"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import chex
import jax
import jax.numpy as jnp
import numpy as np

from remat_kit import _jax, _jaxpr
from remat_kit.policies import from_config
from remat_kit.report.core import compiled_memory, saved_residuals
from remat_kit.transforms import remat

__all__ = [
    "UPDATE_ENV",
    "assert_fingerprint",
    "assert_recompute_deterministic",
    "assert_remat_equivalent",
    "assert_saves",
    "fingerprint",
    "implementations",
    "remat_implementation",
]

# Set to 1 to rewrite pinned fingerprints instead of comparing (the pytest
# option --remat-update-fingerprints sets it).
UPDATE_ENV = "REMAT_KIT_UPDATE_FINGERPRINTS"


def implementations() -> list[str]:
  """The remat implementations this JAX has: ``["classic"]``, plus ``"remat3"``."""
  return ["classic", "remat3"] if _jax.has_remat3() else ["classic"]


@contextlib.contextmanager
def remat_implementation(name: str) -> Iterator[None]:
  """Runs the block under JAX's classic remat or jax_remat3.

  Args:
    name: ``"classic"`` or ``"remat3"`` (one of :func:`implementations`).

  Raises:
    ValueError: for another name, or ``"remat3"`` on a JAX without it.
  """
  if name not in ("classic", "remat3"):
    raise ValueError(f"`remat_implementation`: `name` must be 'classic' or 'remat3', "
                     f"got {name!r}.")
  if name == "remat3" and not _jax.has_remat3():
    raise ValueError(f"`remat_implementation`: jax {jax.__version__} has no jax_remat3; "
                     "use `implementations()` to list what it has.")
  with _jax.remat3(name == "remat3"):
    yield


# --------------------------------------------------------------------------
# assert_remat_equivalent
# --------------------------------------------------------------------------
def _close(what: str, got: Any, want: Any, rtol: float, atol: float) -> None:
  try:
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)
  except AssertionError as e:
    worst = _worst_leaf(got, want)
    raise AssertionError(f"{what}: {worst}\n{e}") from None


def _worst_leaf(got: Any, want: Any) -> str:
  try:
    pairs = zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want))
    diffs = [(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))),
              jax.tree_util.keystr(p)) for (p, a), b in pairs]
  except (TypeError, ValueError):
    return "the trees differ in structure"
  d, path = max(diffs, default=(0.0, ""))
  return f"leaf {path or '(root)'} differs by up to {d:.3g}"


def _is_linen(x: Any) -> bool:
  import flax.linen as nn
  return isinstance(x, nn.Module)


def _is_nnx(x: Any) -> bool:
  from flax import nnx
  return isinstance(x, nnx.Module)


def assert_remat_equivalent(fn_or_module: Any, *args: Any, policies: Sequence[Any] = ("full",),
                            rtol: float = 1e-6, atol: float = 1e-6, rngs: Any = None,
                            argnums: int | Sequence[int] = 0, jit: Sequence[bool] = (False, True),
                            impls: Sequence[str] | None = None,
                            static_argnames: str | Sequence[str] = (), **kwargs: Any) -> None:
  """Each policy gives the same outputs and gradients as no remat.

  Args:
    fn_or_module: a function returning a scalar loss (gradients are taken for
      ``argnums``), a Linen module (its ``init`` parameters must match, and
      the gradient of the mean square of its output w.r.t. them), or an NNX
      module (its state's ``nnx.Param`` s).
    *args: example inputs.
    policies: anything :func:`remat_kit.from_config` accepts.
    rtol: relative tolerance (chex's ``assert_trees_all_close``).
    atol: absolute tolerance.
    rngs: Linen rngs for ``init``/``apply`` (``{"params": key, "dropout": key}``);
      the same keys for both runs, so dropout masks must be identical.
    argnums: for a function, which arguments to differentiate.
    jit: run without jit, with it, or both.
    impls: remat implementations to check (default: all this JAX has).
    static_argnames: for a Linen module, the call's arguments that must be static
      (a ``train`` flag), as :func:`remat_kit.flax.remat_policy` takes them.
    **kwargs: more arguments of the function or module call.

  Raises:
    AssertionError: naming the policy, the variant (implementation, jit) and
      the leaf that differed, by how much.
    TypeError: if ``fn_or_module`` is neither a function nor a Flax module.
    ValueError: for a policy :func:`remat_kit.from_config` does not know, an
      unknown implementation in ``impls``, no example inputs, or a function
      that does not return a scalar.
  """
  for p in policies:
    from_config(p)  # an unknown policy is a clear error before any work
  impls = list(impls) if impls is not None else implementations()
  if _is_linen(fn_or_module):
    check = _linen_case(fn_or_module, args, kwargs, rngs, static_argnames)
  elif _is_nnx(fn_or_module):
    check = _nnx_case(fn_or_module, args, kwargs)
  elif callable(fn_or_module):
    check = _fn_case(fn_or_module, args, kwargs, argnums)
  else:
    raise TypeError(f"`assert_remat_equivalent`: expected a function or a Flax module, got "
                    f"{type(fn_or_module).__name__}.")
  for impl in impls:
    with remat_implementation(impl):
      for use_jit in jit:
        want = check(None, use_jit)
        for p in policies:
          got = check(p, use_jit)
          where = f"policy {p!r} ({impl}, {'jit' if use_jit else 'no jit'})"
          for part in want:
            _close(f"{where}: {part}", got[part], want[part], rtol, atol)


def _scalar(out: Any, who: str) -> Any:
  if not (hasattr(out, "shape") and out.shape == ()):
    shape = getattr(out, "shape", type(out).__name__)
    raise ValueError(f"`{who}`: the function must return a scalar loss to be differentiated, "
                     f"got {shape}. Reduce it (jnp.sum / jnp.mean), or pass a Flax module.")
  return out


def _fn_case(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
             argnums: int | Sequence[int]) -> Callable[[Any, bool], dict[str, Any]]:
  if not args:
    raise ValueError("`assert_remat_equivalent`: give example arguments for the function.")
  _scalar(jax.eval_shape(lambda *a: fn(*a, **kwargs), *args), "assert_remat_equivalent")

  def check(policy: Any, use_jit: bool) -> dict[str, Any]:
    f = fn if policy is None else remat(fn, policy=policy)
    vg = jax.value_and_grad(lambda *a: f(*a, **kwargs), argnums=argnums)
    value, grads = (jax.jit(vg) if use_jit else vg)(*args)
    return {"output": value, "gradients": grads}

  return check


def _mean_square(out: Any) -> Any:
  leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree_util.tree_leaves(out)]
  return sum(jnp.mean(x * x) for x in leaves)


def _linen_case(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], rngs: Any,
                static_argnames: str | Sequence[str] = ()
                ) -> Callable[[Any, bool], dict[str, Any]]:
  from remat_kit.flax import remat_policy
  if not args:
    raise ValueError("`assert_remat_equivalent`: give example inputs for the module.")
  rngs = rngs if rngs is not None else {"params": jax.random.key(0),
                                        "dropout": jax.random.key(1)}
  fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
            if f.init and f.name not in ("parent", "name")}

  def build(policy: Any) -> Any:
    if policy is None:
      return module
    return remat_policy(policy, static_argnames=static_argnames)(type(module))(**fields)

  def check(policy: Any, use_jit: bool) -> dict[str, Any]:
    m = build(policy)
    init = lambda r: m.init(r, *args, **kwargs)  # inputs closed over: Python flags stay static
    variables = (jax.jit(init) if use_jit else init)(rngs)
    apply_rngs = {k: v for k, v in rngs.items() if k != "params"}

    def loss(params: Any) -> Any:
      out = m.apply({**variables, "params": params}, *args, rngs=apply_rngs, **kwargs)
      return _mean_square(out), out

    vg = jax.value_and_grad(loss, has_aux=True)
    (_, out), grads = (jax.jit(vg) if use_jit else vg)(variables["params"])
    return {"parameters": variables, "output (dropout masks included)": out,
            "gradients": grads}

  return check


def _nnx_case(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> Callable[[Any, bool], dict[str, Any]]:
  from flax import nnx
  # Two filters: exactly three parts (flax types the rest as a variadic tuple).
  graphdef, params, rest = cast(tuple[Any, Any, Any], nnx.split(module, nnx.Param, ...))

  def check(policy: Any, use_jit: bool) -> dict[str, Any]:
    def call(p: Any, *a: Any) -> Any:
      return nnx.merge(graphdef, p, rest)(*a, **kwargs)

    f = call if policy is None else remat(call, policy=policy)

    def loss(p: Any) -> Any:
      out = f(p, *args)
      return _mean_square(out), out

    vg = jax.value_and_grad(loss, has_aux=True)
    (_, out), grads = (jax.jit(vg) if use_jit else vg)(params)
    return {"output": out, "gradients": grads}

  return check


# --------------------------------------------------------------------------
# assert_saves
# --------------------------------------------------------------------------
def _saved(fn: Callable[..., Any], args: tuple[Any, ...], argnums: int | Sequence[int]
           ) -> list[Any]:
  nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  for a in nums:
    if not isinstance(a, int) or not 0 <= a < len(args):
      raise ValueError(f"`argnums` {argnums!r} must index the {len(args)} arguments.")
  _scalar(jax.eval_shape(fn, *args), "assert_saves")
  rest = {i: a for i, a in enumerate(args) if i not in nums}

  def of_diff(*diff: Any) -> Any:
    it = iter(diff)
    return fn(*[rest[i] if i in rest else next(it) for i in range(len(args))])

  return [r for r in saved_residuals(of_diff, *[args[i] for i in nums])
          if r.kind == "activation"]


def _describe(rows: list[Any]) -> str:
  if not rows:
    return "nothing"
  return ", ".join(f"{','.join(r.names) or r.label} {r.dtype}{list(r.shape)} ({r.bytes:,} B)"
                   for r in rows)


def assert_saves(fn: Callable[..., Any], *args: Any, names: Sequence[str] = (),
                 exact: bool = True, max_bytes: int | None = None,
                 argnums: int | Sequence[int] = 0) -> None:
  """The gradient of ``fn`` keeps exactly (``exact=False``: at least) the named residuals.

  Un-named residuals are allowed unless ``max_bytes`` caps the total of all
  saved activations.

  Args:
    fn: a scalar function, with its remat applied.
    *args: example arguments.
    names: the `checkpoint_name`s the gradient must save (a list, not a str).
    exact: True: no other name may be saved; False: other names may be too.
    max_bytes: the most bytes of saved activations, named or not; None for
      no limit.
    argnums: the arguments the gradient is taken with respect to.

  Raises:
    AssertionError: listing what was saved instead.
    TypeError: if ``names`` is a str.
    ValueError: if ``argnums`` does not index ``args``, or ``fn`` does not
      return a scalar.
  """
  if isinstance(names, str):
    raise TypeError(f"`assert_saves`: `names` must be a list of names, got the string "
                    f"{names!r}; write names=[{names!r}].")
  rows = _saved(fn, args, argnums)
  saved = {n for r in rows for n in r.names}
  want = set(names)
  missing, extra = sorted(want - saved), sorted(saved - want)
  problems = []
  if missing:
    problems.append(f"not saved: {missing}")
  if exact and extra:
    problems.append(f"saved but not asked for: {extra}")
  total = sum(r.bytes for r in rows)
  if max_bytes is not None and total > max_bytes:
    problems.append(f"{total:,} bytes of activations saved, more than max_bytes={max_bytes:,}")
  if problems:
    raise AssertionError(f"`assert_saves`: {'; '.join(problems)}. Saved: {_describe(rows)}.")


# --------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------
def fingerprint(fn: Callable[..., Any], *args: Any, argnums: int | Sequence[int] = 0,
                temp: bool = True) -> dict[str, Any]:
  """What the gradient of ``fn`` saves, as JSON-serializable data.

  ``residuals`` lists each saved activation (label: its names or producing
  primitive; shape; dtype; bytes; scan trip count; memory), sorted;
  ``temp_bytes`` is the compiled gradient's temp on this backend.

  Args:
    fn: a scalar function, with its remat applied.
    *args: example arguments.
    argnums: the arguments the gradient is taken with respect to.
    temp: also compile the gradient, adding ``temp_bytes`` and ``backend``
      (True by default); False reads the jaxpr only.

  Returns:
    ``{"residuals", "activation_bytes"}``, plus ``"temp_bytes"`` and
    ``"backend"`` with ``temp``.

  Raises:
    ValueError: if ``argnums`` does not index ``args``, or ``fn`` does not
      return a scalar.
  """
  rows = _saved(fn, args, argnums)
  out: dict[str, Any] = {
      "residuals": sorted(({"label": ",".join(r.names) or r.label, "shape": list(r.shape),
                            "dtype": r.dtype, "bytes": r.bytes, "layers": r.layers,
                            "memory": r.memory} for r in rows),
                          key=lambda d: json.dumps(d, sort_keys=True)),
      "activation_bytes": sum(r.bytes for r in rows),
  }
  if temp:
    out["temp_bytes"] = compiled_memory(jax.grad(fn, argnums=argnums), *args)["temp_size"]
    out["backend"] = jax.default_backend()
  return out


def _diff(got: dict[str, Any], want: dict[str, Any], temp_rtol: float) -> list[str]:
  key = lambda d: json.dumps(d, sort_keys=True)
  g, w = {key(r): r for r in got["residuals"]}, {key(r): r for r in want["residuals"]}
  lines = [f"  + now saved:       {r['label']} {r['dtype']}{r['shape']} ({r['bytes']:,} B)"
           for k, r in g.items() if k not in w]
  lines += [f"  - no longer saved: {r['label']} {r['dtype']}{r['shape']} ({r['bytes']:,} B)"
            for k, r in w.items() if k not in g]
  if ("temp_bytes" in got and "temp_bytes" in want and got.get("backend") == want.get("backend")
      and abs(got["temp_bytes"] - want["temp_bytes"]) > temp_rtol * max(want["temp_bytes"], 1)):
    lines.append(f"  compiled temp: {want['temp_bytes']:,} -> {got['temp_bytes']:,} bytes "
                 f"(more than {temp_rtol:.0%} apart)")
  return lines


def assert_fingerprint(fn: Callable[..., Any], *args: Any, expected: str | Path | dict[str, Any],
                       argnums: int | Sequence[int] = 0, temp_rtol: float = 0.1,
                       update: bool | None = None) -> None:
  """The gradient of ``fn`` saves what ``expected`` records.

  Args:
    fn: a scalar function, with its remat applied.
    *args: example arguments.
    expected: a fingerprint dict, or a JSON file path. A missing file is
      written (and the test passes), as is any file when ``update`` is true
      or the ``REMAT_KIT_UPDATE_FINGERPRINTS`` environment variable is 1
      (pytest: ``--remat-update-fingerprints``).
    argnums: the arguments the gradient is taken with respect to.
    temp_rtol: how far the compiled temp may move (same backend only).
    update: rewrite the file instead of comparing; None (the default) reads
      the environment variable.

  Raises:
    AssertionError: with a diff of the saved set (and the temp).
    TypeError: if ``expected`` is neither a dict nor a path.
    ValueError: as :func:`fingerprint`.
  """
  got = fingerprint(fn, *args, argnums=argnums)
  if update is None:
    update = os.environ.get(UPDATE_ENV, "") not in ("", "0")
  if isinstance(expected, (str, Path)):
    path = Path(expected)
    if update or not path.exists():
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
      return
    want = json.loads(path.read_text())
    where = f" (pinned in {path}; rewrite with --remat-update-fingerprints or {UPDATE_ENV}=1)"
  elif isinstance(expected, dict):
    want, where = expected, ""
  else:
    raise TypeError(f"`assert_fingerprint`: `expected` must be a dict or a JSON path, got "
                    f"{type(expected).__name__}.")
  lines = _diff(got, want, temp_rtol)
  if lines:
    raise AssertionError("`assert_fingerprint`: what the gradient saves changed"
                         f"{where}:\n" + "\n".join(lines))


# --------------------------------------------------------------------------
# Recompute determinism
# --------------------------------------------------------------------------
def assert_recompute_deterministic(fn: Callable[..., Any], *args: Any, policy: Any = "full",
                                   argnums: int | Sequence[int] = 0, rtol: float = 0.0,
                                   atol: float = 0.0) -> None:
  """Every `checkpoint_name`'d value the backward pass recomputes equals the forward's.

  The gradient of ``remat(fn, policy)`` is evaluated op by op; each tagged
  value is recorded where the forward computes it and again where the
  backward recomputes it, and the two are compared (bit for bit by default).
  Recomputation can differ on GPU (non-deterministic reductions, atomics) or
  with top-k ties; name the values you want checked.

  Args:
    fn: a scalar function (without remat: ``policy`` is applied to it) whose
      values to check are tagged with `checkpoint_name`.
    *args: example arguments (real arrays: the gradient is evaluated).
    policy: the remat policy to apply (anything :func:`remat_kit.from_config`
      accepts; full remat by default).
    argnums: the arguments the gradient is taken with respect to.
    rtol: relative tolerance (0: bit for bit).
    atol: absolute tolerance (0: bit for bit).

  Raises:
    ValueError: if ``fn`` tags no values, or none is recomputed under ``policy``
      (or ``fn`` does not return a scalar).
    AssertionError: naming the value that differed, by how much.
  """
  f = remat(fn, policy=policy)
  nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  _scalar(jax.eval_shape(fn, *args), "assert_recompute_deterministic")
  run, marks, leaves = _jaxpr.marked(lambda *a: jax.grad(f, argnums=nums)(*a), *args)
  closed = jax.make_jaxpr(run)(*leaves)
  seen: dict[str, list[Any]] = {}
  _record(*_jaxpr.closed_parts(closed), leaves, marks, seen)
  if not seen:
    raise ValueError("`assert_recompute_deterministic`: the function tags no values with "
                     "`checkpoint_name`; tag the intermediates to check.")
  again = {n: v for n, v in seen.items() if len(v) > 1}
  if not again:
    raise ValueError(f"`assert_recompute_deterministic`: policy {policy!r} recomputes none of "
                     f"the tagged values {sorted(seen)}; use a policy that recomputes them.")
  for name, values in again.items():
    for i, v in enumerate(values[1:], 1):
      if not np.allclose(np.asarray(v), np.asarray(values[0]), rtol=rtol, atol=atol,
                         equal_nan=True):
        d = float(np.max(np.abs(np.asarray(v, np.float64) - np.asarray(values[0], np.float64))))
        raise AssertionError(f"`assert_recompute_deterministic`: {name!r} recomputed in the "
                             f"backward pass (occurrence {i}) differs from the forward's by "
                             f"up to {d:.3g}.")


def _record(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], marks: Any,
            seen: dict[str, list[Any]]) -> list[Any]:
  """Evaluates ``jaxpr`` op by op, recording the values of tagged ops (into jits and
  remats, whose bodies hold the recomputation)."""
  def step(eqn: Any, invals: list[Any]) -> list[Any]:
    if _jaxpr.is_jit(eqn):
      body, body_consts = _jaxpr.closed_parts(eqn.params["jaxpr"])
      return _record(body, body_consts, invals, marks, seen)
    if _jaxpr.is_remat(eqn):
      b, c = _jaxpr.remat_body(eqn)
      return _record(b, c, invals, marks, seen)
    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    outs = outs if eqn.primitive.multiple_results else [outs]
    name = marks.name_of(str(eqn.source_info.name_stack), eqn.primitive.name)
    if name is not None:
      seen.setdefault(name, []).append(outs[0])
    return outs

  return _jaxpr.evaluate(jaxpr, consts, args, step)
