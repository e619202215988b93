"""Pipeline parallelism with remat, in one package: the schedules (which microbatch each
stage runs in each iteration, and the bubble), the transform (:func:`pipeline`, on
``shard_map`` + ``ppermute``) and the plan (a pipelined step compiled per chip of a
deviceless target: :func:`plan_step`, :func:`largest_microbatch`).

The package is ``pipelining``, not ``pipeline``: ``remat_kit.pipeline`` is the function.
"""

from remat_kit.pipelining.plan import largest_microbatch, plan_step, stage_mesh
from remat_kit.pipelining.schedules import SCHEDULES, ScheduleInfo, schedule_info, stage_key
from remat_kit.pipelining.transform import ITERATION_INPUT, Pipeline, pipeline

__all__ = ["ITERATION_INPUT", "SCHEDULES", "Pipeline", "ScheduleInfo", "largest_microbatch",
           "pipeline", "plan_step", "schedule_info", "stage_key", "stage_mesh"]
