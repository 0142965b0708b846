"""Device meshes, and sharding by rules, for parameters and activations.

    mesh = lx.make_mesh(data=2, fsdp=1, tensor=1, sequence=4)    # 8 devices
    model = lx.from_hf(path, mesh=mesh)     # params placed by the family's rules
    model(ids)                               # runs sharded (GSPMD)

The mesh has four named axes, always in this order (outermost first, so on a multi-host
machine hosts split along "data" and the fast inner links carry "tensor" and "sequence"):

    data      pure data parallelism: the batch is split, parameters are replicated
    fsdp      the batch is split too, and parameters are split along their hidden dimension
              (ZeRO-3 / FSDP: XLA all-gathers a layer's weights when it needs them)
    tensor    Megatron tensor parallelism: attention heads and MLP columns are split
    sequence  the tokens of each sequence are split (ring attention with attention="ring";
              with "xla" / "flash" GSPMD gathers keys and values where attention needs them)

Parameter layout: each model family brings its rules (`lctx_jax.models.Family.sharding_rules`,
e.g. models/llama.py's Megatron layout): rows (pattern, PartitionSpec, heads dimension). A leaf's
"/"-joined path is matched at its end, so the same rules place optimizer states that mirror the
parameter tree (e.g. "0/mu/layers/q/kernel"); the first matching row wins; no match, or a leaf
such as an optimizer step counter, is replicated. The stacked layer axis L (from nn.scan) is
never split.

Divisibility: an axis is dropped from a dimension's spec when the dimension is not divisible by
that axis's size (times the axes already kept for it), and axes the mesh lacks are dropped, so
every rule fits every model and mesh: e.g. a model with 2 key/value heads on tensor=4 keeps its
k and v kernels whole on every tensor device (their q and o still split), and a vocabulary of
32001 stays unsplit over "tensor". With `head_dim` given (Model and the loaders always give it),
a rule's heads dimension (e.g. q/k/v out, o in) counts whole heads: a head is never cut in two.
Trailing unsplit dimensions are removed, so a fully replicated leaf has spec P().

Activation layout: batch over ("data", "fsdp"), tokens over "sequence" (`activation_spec`):
input_ids, positions and segment_ids [B, T] -> P(("data", "fsdp"), "sequence"); hidden states
[B, T, H] -> P(("data", "fsdp"), "sequence", None); logits [B, T, V] -> P(("data", "fsdp"),
"sequence", "tensor"). The same divisibility rule applies (a batch of 1 is simply unsplit).

Where it is applied: `from_hf(..., mesh=)` and `load(dir, mesh=)` place each parameter straight
into its rule sharding (each device receives only its shard); `Model.init(..., mesh=)` creates
them so. `model(ids)` jits with these in_shardings and the activation out_sharding.
`ModelSpec.apply` (the pure forward for training) constrains its params to the rules, so
gradients come out split alike, and the decoder constrains the hidden states, positions and
segment ids to the activation layout (not with a KV cache). Everything else is GSPMD propagation. A
training step should give its params and optimizer state `param_shardings(...)` as
out_shardings (optimizer states match the rules by path suffix).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# The mesh axis names, defined here only: everything else imports them.
DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
TENSOR_AXIS = "tensor"
SEQUENCE_AXIS = "sequence"
AXES = (*BATCH_AXES, TENSOR_AXIS, SEQUENCE_AXIS)

# ----------------------------------------------------------------------------- mesh


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, sequence: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "tensor", "sequence"), in that order.

    One size may be -1 (default: data), meaning all devices the others leave. devices: default
    jax.devices() (every device of every process). On TPU / GPU the devices are laid out by
    `mesh_utils.create_device_mesh` so inner axes get the fastest links; where it cannot (axis
    sizes that are not products of the slice's physical dimensions, devices= that are not a
    whole block of the slice) they keep the order given, with a warning naming the axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = dict(zip(AXES, (data, fsdp, tensor, sequence)))
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (
                size < 1 and size != -1):
            raise ValueError(f"mesh axis {name}={size!r}: sizes are positive ints, or -1 for "
                             "'all remaining devices'")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {rest}; give the others sizes")
    given = math.prod(size for size in sizes.values() if size != -1)
    set_sizes = {name: size for name, size in sizes.items() if size != -1}
    factors = [f"{name}={size}" for name, size in set_sizes.items()
               if size != 1 or set(set_sizes.values()) == {1}]  # the sizes that matter
    described = " × ".join(factors) + (f" = {given}" if len(factors) > 1 else "")
    counted = f"{n} device" + ("s" if n != 1 else "")
    if rest:
        if n % given:
            raise ValueError(f"{described} does not divide the {counted}, so {rest[0]}=-1 "
                             f"has no size; choose sizes whose product divides {n}, or pass "
                             f"devices= a subset of {given}·k devices")
        sizes[rest[0]] = n // given
    elif given != n:
        raise ValueError(f"{described}, but there are {counted}; make the product equal {n}, "
                         "set one axis to -1 to take the remaining devices, or pass devices= a "
                         f"list of {given} devices")
    shape = tuple(sizes[a] for a in AXES)
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception as error:  # a subset of a TPU slice, or an unknown topology: plain order
        if devices[-1].platform != "cpu":  # simulated CPU devices have no topology to miss
            warnings.warn(_plain_order_warning(sizes, devices, error), stacklevel=2)
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES)


def _plain_order_warning(sizes: Mapping[str, int], devices: Sequence[Any],
                         error: Exception) -> str:
    """What make_mesh warns when `create_device_mesh` raised `error` for these axis sizes."""
    split = ", ".join(f"{name}={size}" for name, size in sizes.items() if size > 1)
    return (f"make_mesh({split}): mesh_utils.create_device_mesh cannot lay out these "
            f"{len(devices)} {devices[-1].platform} devices on their physical topology "
            f"({type(error).__name__}: {error}), so they are placed in the order given: "
            f"neighbours along the mesh axes (the ring's along {SEQUENCE_AXIS!r}, the groups "
            f"of {TENSOR_AXIS!r}) may not be physical neighbours, and their collectives may "
            "cross slow links. To fix it, choose axis sizes that are each a product of some of "
            "the slice's dimensions (e.g. sequence=4 or 16 on a 4x4x4 slice), or pass devices= "
            "a whole block of the slice (every chip of a sub-cuboid).")


# ----------------------------------------------------------------------------- specs


def axes_of(entry: Any) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh,
             units: Mapping[int, int] | None = None) -> P:
    """`spec` with the axes that do not fit `shape` on `mesh` dropped (see the module docstring).

    units {dim: u}: dimension dim is split only at multiples of u (e.g. head_dim), i.e. its
    divisibility is judged on shape[dim] // u.
    """
    spec = tuple(spec)
    if len(spec) > len(shape):
        raise ValueError(f"partition spec {P(*spec)} has {len(spec)} entries for an array of "
                         f"shape {tuple(shape)}")
    out: list[Any] = []
    for dim, entry in enumerate(spec):
        unit = (units or {}).get(dim, 1)
        count = shape[dim] // unit if shape[dim] % unit == 0 else shape[dim]
        kept: list[str] = []
        split = 1
        for axis in axes_of(entry):
            size = mesh.shape.get(axis)
            if size is not None and axis not in kept and count % (split * size) == 0:
                kept.append(axis)
                split *= size
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _path_string(path: Sequence[Any]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


Rules = Sequence[tuple[str, P, "int | None"]]


def param_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: Rules,
               head_dim: int | None = None) -> P:
    """The fitted PartitionSpec of the parameter (or optimizer-state leaf) at `path` by the
    first of `rules` (pattern, spec, heads dimension or None) whose pattern matches the end of
    the path at a "/" boundary; no match: replicated. The heads dimension holds heads ·
    head_dim and is split only between whole heads."""
    for pattern, spec, heads in rules:
        unknown = {a for entry in spec for a in axes_of(entry)} - set(AXES)
        if unknown:
            raise ValueError(f"sharding rule {pattern!r} names mesh axes {sorted(unknown)}; "
                             f"the axes are {AXES}")
        if re.search(r"(^|/)" + pattern + r"$", path):
            if len(tuple(spec)) > len(shape):  # e.g. an unstacked [in, out] kernel
                spec = P(*tuple(spec)[len(tuple(spec)) - len(shape):])
                heads = None if heads is None else heads - 1
            units = {heads: head_dim} if heads is not None and head_dim else None
            return fit_spec(spec, shape, mesh, units)
    return P()


def param_specs(params_or_shapes: Any, mesh: Mesh, rules: Rules,
                head_dim: int | None = None) -> Any:
    """The PartitionSpec tree of a parameter tree (arrays, numpy or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: param_spec(_path_string(path), np.shape(leaf), mesh, rules,
                                      head_dim),
        params_or_shapes)


def param_shardings(params_or_shapes: Any, mesh: Mesh, rules: Rules,
                    head_dim: int | None = None) -> Any:
    """The NamedSharding tree of a parameter tree (or of an optimizer state mirroring it)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                        param_specs(params_or_shapes, mesh, rules, head_dim),
                        is_leaf=lambda x: isinstance(x, P))


def activation_spec(*trailing: Any) -> P:
    """P(("data", "fsdp"), "sequence", *trailing): [B, T, ...] activations (unfitted)."""
    return P(BATCH_AXES, SEQUENCE_AXIS, *trailing)


def activation_sharding(mesh: Mesh, shape: Sequence[int], *trailing: Any) -> NamedSharding:
    """The fitted NamedSharding of a [B, T, ...] activation, e.g. input_ids [B, T]."""
    return NamedSharding(mesh, fit_spec(activation_spec(*trailing), shape, mesh))


def constrain(x: jax.Array | None, mesh: Mesh | None, *trailing: Any) -> jax.Array | None:
    """with_sharding_constraint of a [B, T, ...] activation to its fitted activation spec;
    no-op without a mesh (or for None)."""
    if mesh is None or x is None:
        return x
    return jax.lax.with_sharding_constraint(x, activation_sharding(mesh, x.shape, *trailing))


def place(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array placed so that each device receives only its own shard."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def held_rows(named: NamedSharding, shape: Sequence[int], axis: int = 0) -> dict[int, tuple]:
    """{process index: the sorted indices along `axis` of a `shape` array that its devices hold
    (the union of their shards)}, for every process of the sharding's mesh."""
    rows: dict[int, set] = {}
    for device, index in named.devices_indices_map(tuple(shape)).items():
        start, stop, _ = index[axis].indices(shape[axis])
        rows.setdefault(device.process_index, set()).update(range(start, stop))
    return {process: tuple(sorted(held)) for process, held in rows.items()}


def place_rows(local: np.ndarray, named: NamedSharding, shape: Sequence[int],
               rows: Sequence[int], axis: int = 0) -> jax.Array:
    """The global `shape` array of which this process holds the `rows` (sorted indices along
    `axis`, `held_rows`) as `local` (whole along every other axis): each local device receives
    its shard (multi-host: every process places its own rows)."""
    rows = np.asarray(rows)

    def part(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[axis].indices(shape[axis])
        first = int(np.searchsorted(rows, start))
        local_index = list(index)
        local_index[axis] = slice(first, first + stop - start)
        return local[tuple(local_index)]

    return jax.make_array_from_callback(tuple(shape), named, part)
