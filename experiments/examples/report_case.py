"""An example target for ``python -m remat_kit report``.

    python -m remat_kit report experiments/examples/report_case.py:gpt_policies
"""

import jax
import jax.numpy as jnp

from remat_kit.models import GPT


def gpt_policies():
  """Three remat policies on a small GPT: ({label: loss}, (params,))."""
  tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, 128)
  keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  params = GPT(128, 64, 64, 4, 4, policy=False).init(keys, tokens)["params"]

  def loss_for(policy):
    model = GPT(128, 64, 64, 4, 4, policy=policy)

    def loss(p):
      out = model.apply({"params": p}, tokens, rngs={"dropout": jax.random.key(2)})
      return jnp.mean(out ** 2)
    return loss

  return {"no remat": loss_for(False), "full": loss_for(True),
          "save_dots": loss_for("save_dots")}, (params,)
