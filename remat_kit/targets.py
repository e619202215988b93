"""Where a compile happens: the local backend, or a TPU or GPU that is not here.

JAX compiles for accelerators it does not have: with ``libtpu`` installed,
``jax.experimental.topologies`` gives compile-only TPU devices; with a CUDA
plugin (``jax-cuda12-plugin`` or ``jax-cuda13-plugin``, whichever is installed)
and a GPU target config, compile-only GPU devices. The
real compiler then assigns buffers, so its memory figures are the target's,
not the local CPU's (XLA:CPU undoes remat in Python loops; TPU and GPU keep
it). Nothing runs there: arguments may be ``jax.ShapeDtypeStruct``s of any size.

Target strings:

* ``None`` / ``"cpu"`` / ``"local"``: the local default backend.
* ``"tpu:<generation>:<topology>"`` as libtpu names them, e.g. ``"tpu:v5e:2x2"``,
  ``"tpu:v6e:2x2"``, ``"tpu:v5e:16x16"``, ``"tpu:v4:2x2x1"``, ``"tpu:v5p:2x2x1"``,
  ``"tpu:tpu7x:2x2x1"`` (libtpu 0.0.50 and later: JAX 0.12).
* ``"gpu:h100"``, ``"gpu:a100"``: one GPU of that model, from the published
  facts in :data:`GPU_SPECS`. Deviceless GPU compiles skip GEMM autotuning,
  so temp may differ a little from a real card's.

Install: :func:`compiler` says what is installed for each platform and, where
nothing is, the package that exists for the installed JAX (``make test`` and
``make bench`` install both from the lock). For JAX 0.12.1 that is
``libtpu==0.0.52`` (``jax[tpu]==0.12.1`` pins ``libtpu==0.0.53.*``, which was
never published) and ``jax-cuda13-plugin==0.12.1`` (no CUDA 12 plugin was
published for 0.12.1).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from remat_kit import _jax, _xla

__all__ = ["CHIPS", "GPU_SPECS", "Compiler", "CompilerMissing", "Target", "bytes_moved", "can_offload", "compile_for",
           "compiler",
           "has_host_memory",
           "hbm_bytes_moved",
           "parse_target", "place"]

EXAMPLES = ("cpu", "tpu:v5e:2x2", "tpu:v6e:2x2", "tpu:v5e:16x16", "tpu:v4:2x2x1",
            "tpu:v5p:2x2x1", "tpu:tpu7x:2x2x1", "gpu:h100", "gpu:a100")


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published peak rates of one chip, used by the step-time estimate.

  Attributes:
    peak_flops: dense bf16 matrix FLOP/s.
    hbm_bandwidth: HBM bytes/s.
    hbm_bytes: HBM capacity per chip.
    source: where the figures come from.
    host_bandwidth: bytes/s one way between the chip and host memory (PCIe),
      what an offloaded activation's copy out and back runs at.
    host_source: where that figure comes from.
  """

  peak_flops: float
  hbm_bandwidth: float
  hbm_bytes: int
  source: str
  host_bandwidth: float
  host_source: str


# Vendor datasheets (Google Cloud TPU system architecture pages; NVIDIA H100/A100 SXM).
# Host links: Google publishes no per-chip PCIe figure for TPUs; the JAX scaling
# book ("How to Think About TPUs") works with 1.5e10 B/s per chip, one way. NVIDIA's
# datasheets give PCIe Gen5 x16 128 GB/s (H100) and Gen4 x16 64 GB/s (A100), both
# directions together.
_TPU_PCIE = (1.5e10, "PCIe ~1.5e10 B/s per chip one way (JAX scaling book, TPU chapter)")
CHIPS: dict[str, Chip] = {
    "v4": Chip(275e12, 1228e9, 32 * 2**30, "Cloud TPU v4: 275 TFLOP/s bf16, 1228 GB/s, 32 GiB",
               *_TPU_PCIE),
    "v5e": Chip(197e12, 819e9, 16 * 2**30, "Cloud TPU v5e: 197 TFLOP/s bf16, 819 GB/s, 16 GiB",
                *_TPU_PCIE),
    "v5p": Chip(459e12, 2765e9, 95 * 2**30, "Cloud TPU v5p: 459 TFLOP/s bf16, 2765 GB/s, 95 GiB",
                *_TPU_PCIE),
    "v6e": Chip(918e12, 1640e9, 32 * 2**30, "Cloud TPU v6e: 918 TFLOP/s bf16, 1640 GB/s, 32 GiB",
                *_TPU_PCIE),
    # A TPU7x chip has two TensorCores, and JAX shows each as a device ("tpu:tpu7x:2x2x1"
    # has 8): the figures are per device, half the chip's 2307 TFLOP/s, 192 GiB, 7380 GB/s.
    "tpu7x": Chip(2307e12 / 2, 7380e9 / 2, 96 * 2**30,
                  "Cloud TPU7x (Ironwood) per TensorCore device: half of 2307 TFLOP/s bf16, "
                  "7380 GB/s, 192 GiB per chip", *_TPU_PCIE),
    "h100": Chip(989e12, 3350e9, 80 * 10**9,
                 "NVIDIA H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 80 GB",
                 64e9, "PCIe Gen5 x16: 64 GB/s one way (NVIDIA H100 datasheet: 128 GB/s)"),
    "a100": Chip(312e12, 2039e9, 80 * 10**9,
                 "NVIDIA A100 SXM 80GB: 312 TFLOP/s dense bf16, 2.039 TB/s HBM2e, 80 GB",
                 32e9, "PCIe Gen4 x16: 32 GB/s one way (NVIDIA A100 datasheet: 64 GB/s)"),
}

# stream_executor.GpuTargetConfigProto text, written from each GPU's published
# facts (SM count, shared memory and registers per SM, L2, HBM bandwidth and
# size, boost clock, compute capability). Fields JAX 0.10 rejects are left out.
_GPU_TEMPLATE = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_per_sm}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {cc_major} minor: {cc_minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 1 patch: 0 }}
device_description_str: "{name}"
"""

GPU_SPECS: dict[str, dict[str, Any]] = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", sms=132, fpus=128, smem_per_sm=233472,
                 smem_optin=232448, bandwidth=3352320000000, l2=52428800, clock=1.98,
                 memory=85520809984, cc_major=9, cc_minor=0),
    "a100": dict(name="NVIDIA A100-SXM4-80GB", sms=108, fpus=64, smem_per_sm=167936,
                 smem_optin=166912, bandwidth=2039040000000, l2=41943040, clock=1.41,
                 memory=85100068864, cc_major=8, cc_minor=0),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """A compile target.

  Attributes:
    name: the canonical string (``"cpu"``, ``"tpu:v5e:2x2"``, ``"gpu:h100"``).
    platform: ``"local"``, ``"tpu"`` or ``"gpu"``.
    generation: TPU generation or GPU model (``"v5e"``, ``"h100"``); "" locally.
    topology: libtpu topology name (``"v5e:2x2"``) or ``"1x1x1"`` for a GPU.
  """

  name: str
  platform: str
  generation: str = ""
  topology: str = ""

  @property
  def is_local(self) -> bool:
    return self.platform == "local"

  @property
  def chip(self) -> Chip | None:
    return CHIPS.get(self.generation)

  def devices(self) -> list[Any]:
    """The target's (compile-only) devices, or the local ones."""
    if self.is_local:
      return jax.devices()
    return list(_topology(self).devices)

  def mesh(self, shape: tuple[int, ...] | None = None, axes: tuple[str, ...] = ("x",)) -> Any:
    """A mesh over the target's devices (all of them in one axis by default).

    Args:
      shape: the mesh shape; None for ``(number of devices,)``. It may use
        fewer devices than the target has: the first ones.
      axes: the axis names, one per entry of ``shape`` (``("x",)`` by default).
    """
    devs = self.devices()
    shape = shape or (len(devs),)
    import numpy as np

    return jax.sharding.Mesh(np.array(devs[: int(np.prod(shape))]).reshape(shape), axes)


def _bad(value: Any, why: str) -> ValueError:
  return ValueError(
      f"`target`: {why}, got {value!r}. Working examples: {', '.join(map(repr, EXAMPLES))}.")


def has_host_memory(target: Any = None) -> bool:
  """Whether offloading to host memory takes bytes off the device on ``target``.

  True for accelerator targets, and locally on a GPU/TPU backend with
  ``pinned_host`` memory. False on XLA:CPU, which has one memory: offloaded
  values are marked for the host but stay in temp.

  Args:
    target: anything :func:`parse_target` accepts; None for the local backend.

  Raises:
    ValueError: for a target string :func:`parse_target` refuses.
  """
  t = parse_target(target)
  if not t.is_local:
    return True
  return can_offload() and jax.default_backend() != "cpu"


def can_offload() -> bool:
  """Whether a step that offloads to host memory runs on the local backend (it has
  ``pinned_host`` memory). On XLA:CPU it runs yet frees nothing: see
  :func:`has_host_memory` for whether offloading saves device memory."""
  return "pinned_host" in {m.kind for m in jax.devices()[0].addressable_memories()}


def parse_target(value: Any) -> Target:
  """``value`` (a string, a Target or None) as a :class:`Target`.

  Args:
    value: a :class:`Target` (returned as is); None, ``"cpu"`` or ``"local"``
      for the local backend; ``"tpu:<generation>:<topology>"`` or
      ``"gpu:<model>"`` (see the module's description).

  Returns:
    The :class:`Target`.

  Raises:
    ValueError: for a value that is not a str, an unknown platform, TPU
      generation or GPU model, or a malformed TPU topology; the message lists
      working examples.

  >>> parse_target("tpu:v5e:2x2")
  Target(name='tpu:v5e:2x2', platform='tpu', generation='v5e', topology='v5e:2x2')
  >>> parse_target(None).platform
  'local'
  """
  if isinstance(value, Target):
    return value
  if value is None or value in ("cpu", "local"):
    return Target("cpu" if value is None else value, "local")
  if not isinstance(value, str):
    raise _bad(value, "must be a str such as 'tpu:v5e:2x2'")
  parts = value.strip().lower().split(":")
  if parts[0] == "tpu":
    if len(parts) != 3 or not re.fullmatch(r"\d+(x\d+)+", parts[2]):
      raise _bad(value, "a TPU target is 'tpu:<generation>:<topology>'")
    if parts[1] not in CHIPS or parts[1] in GPU_SPECS:
      known = ", ".join(g for g in CHIPS if g not in GPU_SPECS)
      raise _bad(value, f"unknown TPU generation {parts[1]!r} (known: {known})")
    return Target(value, "tpu", parts[1], f"{parts[1]}:{parts[2]}")
  if parts[0] == "gpu":
    if len(parts) != 2 or parts[1] not in GPU_SPECS:
      raise _bad(value, f"a GPU target is 'gpu:<model>' with model in {sorted(GPU_SPECS)}")
    return Target(value, "gpu", parts[1], "1x1x1")
  raise _bad(value, "unknown target")


# The CUDA plugins, by the module each registers under `jax_plugins` and its distribution.
_CUDA_PLUGINS = (("jax_plugins.xla_cuda13", "jax-cuda13-plugin"),
                 ("jax_plugins.xla_cuda12", "jax-cuda12-plugin"))
# What `make lock` found on the package index for each JAX it locked: the compiler
# packages that exist for it, and what it substituted (`.ci/lock.py` writes this file).
_PUBLISHED = Path(__file__).with_name("_published.json")


@dataclasses.dataclass(frozen=True)
class Compiler:
  """The deviceless compiler for one accelerator platform, as installed here.

  Attributes:
    platform: ``"tpu"`` or ``"gpu"``.
    package: the installed distribution (``"libtpu"``, ``"jax-cuda13-plugin"``),
      or None where there is none.
    version: its version, or None.
    module: the module that registers it with JAX (``"libtpu"``,
      ``"jax_plugins.xla_cuda13"``), or None.
    install: the requirement that gets a compiler for the installed JAX, e.g.
      ``"jax-cuda13-plugin==0.12.1"``.
    note: where the installed or suggested compiler is not the one JAX's own
      extra names (a libtpu JAX pins but that was never published), what was
      used instead and why; else None.
  """

  platform: str
  package: str | None
  version: str | None
  module: str | None
  install: str
  note: str | None = None

  @property
  def available(self) -> bool:
    return self.package is not None

  @property
  def missing(self) -> str | None:
    """Why ``target="<platform>:..."`` cannot compile here (a skip reason), or None."""
    if self.available:
      return None
    what = "libtpu" if self.platform == "tpu" else "a CUDA plugin"
    return (f"no {self.platform.upper()} compiler: {what} is not installed for jax "
            f"{jax.__version__}; install it with: pip install \"{self.install}\"")


class CompilerMissing(RuntimeError):
  """A deviceless target whose compiler (libtpu, a CUDA plugin) is not installed.

  Attributes:
    platform: ``"tpu"`` or ``"gpu"``.
  """

  def __init__(self, platform: str, message: str):
    super().__init__(message)
    self.platform = platform


def _published() -> dict[str, Any]:
  try:
    return dict(json.loads(_PUBLISHED.read_text()).get(jax.__version__, {}))
  except (OSError, ValueError):  # pragma: no cover - a damaged install
    return {}


def _dist_version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def _jax_libtpu_pin() -> str | None:
  """The libtpu requirement of ``jax[tpu]`` for the installed JAX (``"==0.0.53.*"``)."""
  for req in importlib.metadata.requires("jax") or ():
    m = re.match(r"libtpu\s*([^;]+);\s*extra\s*==\s*[\"']tpu[\"']", req)
    if m:
      return m.group(1).replace(" ", "")
  return None


def compiler(platform: str) -> Compiler:
  """The deviceless compiler installed for ``platform`` (``"tpu"`` or ``"gpu"``).

  Finds libtpu, and whichever CUDA plugin is installed (CUDA 13, then 12). The
  install hint names the package that exists for the installed JAX, as
  ``make lock`` found it on the index; for a JAX it never locked, JAX's own
  extra (``jax[tpu]``) or both CUDA plugins.

  Args:
    platform: ``"tpu"`` or ``"gpu"``.

  Raises:
    ValueError: for another platform.

  >>> compiler("tpu").platform
  'tpu'
  """
  if platform not in ("tpu", "gpu"):
    raise ValueError(f"`compiler`: platform must be 'tpu' or 'gpu', got {platform!r}.")
  published = _published()
  v = jax.__version__
  if platform == "tpu":
    pin = _jax_libtpu_pin()
    install = published.get("tpu") or f"jax[tpu]=={v}"
    version = _dist_version("libtpu") if importlib.util.find_spec("libtpu") else None
    note = None
    if pin and re.fullmatch(r"==[\d.]+(\.\*)?", pin):
      want = pin[2:].removesuffix(".*")
      got = version or install.partition("==")[2]
      if got and not (got == want or got.startswith(want + ".")):
        why = [n for n in published.get("notes", ()) if n.startswith("libtpu")]
        note = why[0] if why else f"libtpu {got}, not libtpu{pin}, which jax[tpu]=={v} pins"
    return Compiler("tpu", "libtpu" if version else None, version,
                    "libtpu" if version else None, install, note)
  for module, dist in _CUDA_PLUGINS:
    if importlib.util.find_spec(module.split(".")[0]) and importlib.util.find_spec(module):
      got = _dist_version(dist)
      install = published.get("gpu") or f"{dist}=={v}"
      return Compiler("gpu", dist, got, module, install, None)
  install = published.get("gpu") or f"jax-cuda12-plugin=={v}"
  note = None if published.get("gpu") else (
      f"for jax {v} either jax-cuda12-plugin=={v} or jax-cuda13-plugin=={v}, whichever "
      "the index has (JAX 0.12.1 has only the CUDA 13 one)")
  if published.get("gpu") and "cuda12" not in published["gpu"]:
    note = f"jax-cuda12-plugin=={v} was not published; the CUDA 13 plugin was"
  return Compiler("gpu", None, None, None, install, note)


@functools.cache
def _topology(target: Target) -> Any:
  from jax.experimental import topologies

  if target.platform == "tpu":
    tpu = compiler("tpu")
    if not tpu.available:
      raise CompilerMissing(
          "tpu", f"`target`={target.name!r} needs libtpu to compile for a TPU without one. "
          f'Install it with: pip install "{tpu.install}"'
          + (f" ({tpu.note})" if tpu.note else "") + ".")
    try:
      return topologies.get_topology_desc(platform="tpu", topology_name=target.topology)
    except Exception as e:  # noqa: BLE001 - libtpu's error, made readable
      raise ValueError(
          f"`target`: libtpu refused topology {target.topology!r} ({e}). Topologies known to "
          "work: v5e:2x2, v5e:4x4, v5e:16x16, v4:2x2x1, v5p:2x2x1, v6e:2x2, tpu7x:2x2x1 "
          "(the last with libtpu 0.0.50, JAX 0.12; not v5e:1x1). If another process holds "
          "libtpu's lock (deviceless compiles in parallel processes), set "
          "ALLOW_MULTIPLE_LIBTPU_LOAD=1 in the environment before Python starts.") from e
  gpu = compiler("gpu")
  if gpu.module is None:
    raise CompilerMissing(
        "gpu", f"`target`={target.name!r} needs a CUDA plugin to compile for a GPU without one. "
        f'Install it with: pip install "{gpu.install}"'
        + (f" ({gpu.note})" if gpu.note else "") + ".")
  importlib.import_module(gpu.module)
  config = _GPU_TEMPLATE.format(**GPU_SPECS[target.generation])
  try:
    return topologies.get_topology_desc(platform="cuda", target_config=config,
                                        topology=target.topology)
  except NotImplementedError as e:
    # The plugin registers the "cuda" platform when JAX starts, after checking for the
    # CUDA libraries (cuDNN, cuBLAS) unless JAX_PLATFORMS leaves CUDA out.
    raise RuntimeError(
        f"`target`={target.name!r}: the CUDA plugin is installed but did not register when "
        "JAX started; it checks for the CUDA libraries (cuDNN, ...) first, and this machine "
        "has none. A deviceless compile needs none of them: start Python with "
        "`JAX_PLATFORMS=cpu` (or `JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`) in the environment, "
        "set before JAX is imported.") from e


def _sharding(target: Target) -> Any:
  if target.platform == "gpu":
    return jax.sharding.NamedSharding(target.mesh((1,)), jax.sharding.PartitionSpec())
  return _jax.single_device_sharding(target.devices()[0])


def place(args: Any, target: Target) -> Any:
  """``args`` as ShapeDtypeStructs on the target's first chip (arrays or structs in).

  Leaves that already carry a sharding on the target's devices (a mesh's
  ``NamedSharding``, for a sharded step) keep it.

  Args:
    args: a pytree; its leaves with a ``shape`` and ``dtype`` are placed, the
      others are returned as they are.
    target: a :class:`Target` (already parsed); for the local backend ``args``
      is returned unchanged.
  """
  if target.is_local:
    return args
  default = _sharding(target)
  mine = set(target.devices())

  def one(x: Any) -> Any:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      return x
    sh = getattr(x, "sharding", None)
    if sh is not None and getattr(sh, "device_set", None) and set(sh.device_set) <= mine:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)

  return jax.tree_util.tree_map(one, args)


def trace_for(fn: Callable[..., Any], target: Any, *args: Any, keep_unused: bool = False,
              donate_argnums: tuple[int, ...] = (), **kwargs: Any) -> Any:
  """``jax.jit(fn).trace(...)`` with the arguments placed on ``target``.

  The result's ``jaxpr`` is what :func:`compile_for` compiles (``.lower().compile()``),
  so a readout can count FLOPs and compile from one trace.
  """
  t = parse_target(target)
  jitted = jax.jit(fn, keep_unused=keep_unused, donate_argnums=donate_argnums)
  if t.is_local:
    return jitted.trace(*args, **kwargs)
  return jitted.trace(*place(args, t), **place(kwargs, t))


def compile_for(fn: Callable[..., Any], target: Any, *args: Any,
                compiler_options: dict[str, Any] | None = None, keep_unused: bool = False,
                donate_argnums: tuple[int, ...] = (), **kwargs: Any) -> Any:
  """``jax.jit(fn)`` lowered and compiled for ``target`` (nothing runs).

  ``compiler_options`` go to ``compile()`` (``{"xla_dump_to": dir}``, say);
  ``keep_unused`` keeps arguments the program does not read as parameters;
  ``donate_argnums`` lets outputs reuse those arguments' buffers.

  Args:
    fn: the function to compile.
    target: anything :func:`parse_target` accepts; None for the local backend.
    *args: its positional arguments: arrays or ``jax.ShapeDtypeStruct``s
      (placed on the target's first chip unless they carry a sharding there).
    compiler_options: options for ``compile()``; None for none.
    keep_unused: keep arguments the program does not read (``jax.jit``'s
      ``keep_unused``; False by default).
    donate_argnums: arguments whose buffers the outputs may reuse (none by
      default).
    **kwargs: its keyword arguments, placed as ``args`` are.

  Returns:
    The compiled program (``jax.stages.Compiled``).

  Raises:
    ValueError: for a target :func:`parse_target` refuses, or a TPU topology
      libtpu refuses.
    RuntimeError: for an accelerator target whose compiler (libtpu, the CUDA
      plugin) is not installed or did not register.
  """
  lowered = trace_for(fn, target, *args, keep_unused=keep_unused,
                      donate_argnums=donate_argnums, **kwargs).lower()
  return lowered.compile(compiler_options) if compiler_options else lowered.compile()


# The HLO byte count lives with the other XLA text parsers.
bytes_moved = _xla.bytes_moved
hbm_bytes_moved = _xla.hbm_bytes_moved
