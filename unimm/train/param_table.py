"""The parameter table of a config's model, without making a weight (`--mode=params`).

    python -m unimm.main --mode=params --config=configs/transfusion/7b.py [--topology=v5p-256]

Traced with `eval_shape`, so a 7B config takes seconds on a laptop. One row per parameter: path, shape,
dtype, logical axes, the partition spec the config's sharding rules give it, the shape each device holds
on the config's mesh (over --topology's chips, else this host's devices), its weight-decay multiplier
(`unimm.train.optimizer`), whether it trains (`train.trainable`) and its size; then totals by top-level
module, the matmul / non-matmul split the FLOP count uses (`Family.is_matmul_param`), the active count (a
Mixture-of-Transformers backbone's image-slot copies left out: each token uses its modality's copy only,
and the FLOP count takes the active matmuls), and the bytes of parameters and Adam moments per device.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from unimm import families
from unimm.models import backbone
from unimm.parallel import sharding
from unimm.train import optimizer, settings, setup as setup_lib, step as step_lib


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def param_rows(config, vocab_size: int | None, num_devices: int) -> list[dict]:
  """A dict per parameter (see the module doc), in path order."""
  boxed = setup_lib.abstract_params(config, vocab_size)
  rules = sharding.logical_rules(config.sharding)
  mesh = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
  train = settings.TrainSettings.from_config(config.train)
  wd_mults, partition = train.wd_mults, step_lib.Partition(train.trainable)
  family = families.of(config)
  rows = []
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for key_path, leaf in leaves:
    path = optimizer.path_name(key_path)
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    names = tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else (None,) * len(value.shape)
    spec = tuple(nn.logical_to_mesh_axes(names, rules))
    per_device = tuple(math.ceil(d / math.prod(mesh[a] for a in _axes(s))) for d, s in zip(value.shape, spec))
    rows.append({
        "path": path, "shape": tuple(value.shape), "dtype": str(value.dtype), "logical_axes": names,
        "partition_spec": spec, "per_device_shape": per_device, "count": math.prod(value.shape),
        "per_device_count": math.prod(per_device), "itemsize": value.dtype.itemsize,
        "weight_decay": optimizer.decay_multiplier(path, wd_mults), "trains": partition.trains(path),
        "matmul": family.is_matmul_param(path), "image_copy": backbone.is_image_copy(path)})
  return sorted(rows, key=lambda r: r["path"])


def summary(rows: list[dict], mesh: dict) -> dict:
  """Totals by top-level module, the matmul split, trainable and decayed counts, bytes per device."""
  by_module: dict[str, int] = {}
  for r in rows:
    top = r["path"].split("/")[0]
    by_module[top] = by_module.get(top, 0) + r["count"]
  trains = [r for r in rows if r["trains"]]
  param_bytes = sum(r["per_device_count"] * r["itemsize"] for r in rows)
  adam_bytes = sum(2 * r["per_device_count"] * 4 for r in trains)  # two float32 moments per trained param
  gib = 2.0 ** 30
  return {
      "total": sum(r["count"] for r in rows), "by_module": by_module,
      "active": sum(r["count"] for r in rows if not r["image_copy"]),
      "image_copies": sum(r["count"] for r in rows if r["image_copy"]),
      "matmul": sum(r["count"] for r in rows if r["matmul"] and not r["image_copy"]),
      "non_matmul": sum(r["count"] for r in rows if not r["matmul"] and not r["image_copy"]),
      "trainable": sum(r["count"] for r in trains),
      "weight_decayed": sum(r["count"] for r in trains if r["weight_decay"]),
      "mesh": mesh,
      "per_device_gib": {"params": param_bytes / gib, "adam_moments": adam_bytes / gib,
                         "params_and_moments": (param_bytes + adam_bytes) / gib},
  }


def _spec_text(spec) -> str:
  return "(" + ", ".join("None" if s is None else "×".join(_axes(s)) for s in spec) + ")"


def format_table(rows: list[dict], totals: dict) -> str:
  """The rows as aligned text, then the totals."""
  header = ("path", "shape", "dtype", "logical axes", "spec", "per device", "wd", "trains", "count")
  lines = [header] + [(r["path"], "×".join(map(str, r["shape"])) or "()", r["dtype"],
                       "(" + ", ".join(str(n) for n in r["logical_axes"]) + ")", _spec_text(r["partition_spec"]),
                       "×".join(map(str, r["per_device_shape"])) or "()", f"{r['weight_decay']:g}",
                       "yes" if r["trains"] else "no", f"{r['count']:,}") for r in rows]
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  fmt = lambda line: "  ".join(c.rjust(w) if i == len(line) - 1 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip()
  out = [fmt(lines[0]), "-" * len(fmt(lines[0]))] + [fmt(line) for line in lines[1:]]
  out.append("")
  for module, n in sorted(totals["by_module"].items(), key=lambda kv: -kv[1]):
    out.append(f"{module:<24} {n:>16,}")
  out.append(f"{'total':<24} {totals['total']:>16,}")
  out.append(f"{'active per token':<24} {totals['active']:>16,}")
  out.append(f"{'  in matmuls (6·N)':<24} {totals['matmul']:>16,}")
  out.append(f"{'  not (embeddings, ViT)':<24} {totals['non_matmul']:>16,}")
  if totals["image_copies"]:
    out.append(f"{'image-slot copies (MoT)':<24} {totals['image_copies']:>16,}")
  out.append(f"{'trainable':<24} {totals['trainable']:>16,}")
  out.append(f"{'  with weight decay':<24} {totals['weight_decayed']:>16,}")
  mesh = "×".join(f"{k}={v}" for k, v in totals["mesh"].items())
  mem = totals["per_device_gib"]
  out.append(f"per device on mesh {mesh}: params {mem['params']:.2f} GiB + Adam moments "
             f"{mem['adam_moments']:.2f} GiB = {mem['params_and_moments']:.2f} GiB")
  return "\n".join(out)
