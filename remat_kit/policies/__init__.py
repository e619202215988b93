"""Rematerialization policies as values.

A policy decides, for every intermediate value of a checkpointed function,
whether the forward pass **saves** it for the backward pass, **offloads** it to
host memory, or lets the backward pass **recompute** it.

Every policy here is a frozen, hashable dataclass with a readable ``repr`` and
is itself a valid ``jax.checkpoint`` policy::

  >>> import jax, remat_kit as rk
  >>> policy = rk.policies.save_only_these_names("qkv") | rk.policies.dots_saveable()
  >>> policy
  Union(policies=(SaveDots(no_batch_dims=False), SaveNames(names=('qkv',))))
  >>> f = jax.checkpoint(lambda x: x * 2, policy=policy)  # accepted as is

Policies compose with ``|`` (save if either saves) and ``&`` (save only if
both save), and :func:`from_config` builds them from booleans, strings and
dicts, so they can live in a config file.

Use :func:`remat_kit.remat` rather than ``jax.checkpoint`` to apply them: it
checks that every name a policy refers to is actually tagged in the function,
keeps working under ``jax_remat3`` (which silently ignores callable policies),
and makes :func:`save_anything_except_these_names` really exclude its names.
For a third-party wrapper (``nn.remat``, ``eqx.filter_checkpoint``,
``hk.remat``), pass :func:`remat_kit.to_jax_policy` of the policy.

The package is split by job: :mod:`~remat_kit.policies.base` (the protocol
and combinators), :mod:`~remat_kit.policies.library` (leaf policies),
:mod:`~remat_kit.policies.factories` (JAX's factory names) and
:mod:`~remat_kit.policies.config` (registry and parser).
"""

from remat_kit.policies import base as _base
from remat_kit.policies import config as _config
from remat_kit.policies import factories as _factories
from remat_kit.policies import library as _library
from remat_kit.policies.base import DEFAULT_OFFLOAD_DST as DEFAULT_OFFLOAD_DST
from remat_kit.policies.base import DEFAULT_OFFLOAD_SRC as DEFAULT_OFFLOAD_SRC
from remat_kit.policies.base import Intersection as Intersection
from remat_kit.policies.base import Offload as Offload
from remat_kit.policies.base import Policy as Policy
from remat_kit.policies.base import Union as Union
from remat_kit.policies.config import from_config as from_config
from remat_kit.policies.config import offload as offload
from remat_kit.policies.config import register as register
from remat_kit.policies.config import registered as registered
from remat_kit.policies.config import save_from_all_policies as save_from_all_policies
from remat_kit.policies.config import save_from_both_policies as save_from_both_policies
from remat_kit.policies.config import save_if_all_policies_save as save_if_all_policies_save
from remat_kit.policies.factories import checkpoint_dots as checkpoint_dots
from remat_kit.policies.factories import (
    checkpoint_dots_with_no_batch_dims as checkpoint_dots_with_no_batch_dims,
)
from remat_kit.policies.factories import dots_saveable as dots_saveable
from remat_kit.policies.factories import (
    dots_with_no_batch_dims_saveable as dots_with_no_batch_dims_saveable,
)
from remat_kit.policies.factories import everything_saveable as everything_saveable
from remat_kit.policies.factories import nothing_saveable as nothing_saveable
from remat_kit.policies.factories import (
    offload_dot_with_no_batch_dims as offload_dot_with_no_batch_dims,
)
from remat_kit.policies.factories import offload_these_names as offload_these_names
from remat_kit.policies.factories import (
    save_and_offload_only_these_names as save_and_offload_only_these_names,
)
from remat_kit.policies.factories import save_any_names_but_these as save_any_names_but_these
from remat_kit.policies.factories import (
    save_anything_except_these_names as save_anything_except_these_names,
)
from remat_kit.policies.factories import save_by_size as save_by_size
from remat_kit.policies.factories import save_only_these_names as save_only_these_names
from remat_kit.policies.factories import save_these_primitives as save_these_primitives
from remat_kit.policies.library import CallablePolicy as CallablePolicy
from remat_kit.policies.library import OffloadNames as OffloadNames
from remat_kit.policies.library import SaveAnyNamesBut as SaveAnyNamesBut
from remat_kit.policies.library import SaveAnythingExcept as SaveAnythingExcept
from remat_kit.policies.library import SaveBySize as SaveBySize
from remat_kit.policies.library import SaveDots as SaveDots
from remat_kit.policies.library import SaveEverything as SaveEverything
from remat_kit.policies.library import SaveNames as SaveNames
from remat_kit.policies.library import SaveNothing as SaveNothing
from remat_kit.policies.library import SaveOrOffloadNames as SaveOrOffloadNames
from remat_kit.policies.library import SavePrimitives as SavePrimitives

# What each module exports (the explicit re-exports above name them for type checkers).
__all__ = _base.__all__ + _config.__all__ + _library.__all__ + _factories.__all__
