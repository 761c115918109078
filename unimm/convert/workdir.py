"""Hugging Face checkpoints ⇄ unimm workdirs: what `python -m unimm.convert` (unimm/convert/cli.py) runs.

    python -m unimm.convert --from_hf=/models/Qwen2.5-0.5B --workdir=/runs/qwen [--seq_len=4096]
    python -m unimm.convert --to_hf --workdir=/runs/qwen --out=/models/qwen-continued

Import writes a workdir: `config.json` (a Transfusion config whose text model is the checkpoint's, its
tokenizer the checkpoint's `tokenizer.json`, `train.init_from` the converted weights; `--config=FILE`
starts from another config, e.g. a recipe, whose backbone and vocabulary are then replaced) and
`converted/` (the `embed` / `decoder` / `lm_head` params, `save_params`). A SigLIP vision tower
or a diffusers AutoencoderKL converts to `converted_vision/` (resp. `converted_vae/`) and prints the
`config.model.vision` / `config.model.autoencoder` settings that read it. Every mode of
`unimm.main` then works on the workdir alone (`--workdir=W`, no `--config`): `score`, `sample` and `eval`
read the converted weights until training wrote its first checkpoint (the image layers start fresh);
`train` starts from them.

Vocabulary: ids the checkpoint lacks (≥ its vocab_size: unimm's roles appended after the tokenizer's
vocabulary — BOI, EOI, IMG, reserved — where the checkpoint has no spare rows for them) get new rows
initialised to the mean of the checkpoint's embeddings (and of its head's columns); roles that land in a
padded checkpoint's spare rows (Qwen2's) keep those rows, so a round trip gives back the same tensors. The
model's rows are padded to a multiple of 128. Export writes the rows up to the larger
of the checkpoint's vocabulary and the tokenizer's ids: padding is dropped, unimm's trained specials kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import logging
from flax import traverse_util
import numpy as np

CONVERTED_DIR = "converted"  # the converted weights inside the workdir (`save_params`)
CONVERTED_VAE_DIR = "converted_vae"  # a converted AutoencoderKL (the Transfusion codec's `checkpoint`)
CONVERTED_VISION_DIR = "converted_vision"  # a converted SigLIP tower (Janus's `model.vision.checkpoint`)
CONVERTED_VQ_DIR = "converted_vq"  # a converted VQGAN (a code family's frozen `model.vq.checkpoint`)


def _hf_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face model directory")
  return _hf_config_file(path)


def _hf_config_file(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def grow_vocabulary(params: dict, rows: int) -> dict:
  """`params` with the embedding and LM head grown to `rows` ids, the new ones at the mean of the old."""
  embedding, head = params["embed"]["embedding"], params["lm_head"]["kernel"]
  old = embedding.shape[0]
  if rows <= old:
    return params
  grown_embedding = np.concatenate([embedding, np.repeat(embedding.mean(0, keepdims=True), rows - old, 0)], 0)
  grown_head = np.concatenate([head, np.repeat(head.mean(1, keepdims=True), rows - old, 1)], 1)
  return {**params, "embed": {"embedding": grown_embedding}, "lm_head": {"kernel": grown_head}}


def workdir_config(base, spec, source: str, tokenizer_ids: int | None, seq_len: int, scan: bool):
  """`base` with the converted LM as its text model."""
  from unimm import families  # pylint: disable=g-import-not-at-top
  c = base
  c.model.backbone.update(spec.backbone, scan=scan)
  c.model.vocab_size = families.padded_vocabulary(max(spec.vocab_size, tokenizer_ids or 0))
  c.data.seq_len = seq_len
  if tokenizer_ids is not None:
    c.data.tokenizer.path = source
  with c.unlocked():  # config files come locked (config_flags); `hf` is a new node
    c.hf = {"model_type": spec.model_type, "vocab_size": spec.vocab_size, "torch_dtype": spec.torch_dtype,
            "tied_embeddings": spec.tied_embeddings, "max_positions": spec.max_positions, "source": source,
            "sliding_window": -1 if spec.sliding_window is None else int(spec.sliding_window),
            **{f"{k}_token_id": (-1 if v is None else int(v)) for k, v in spec.special_ids.items()}}
  return c


def _fresh(directory: str) -> str:
  """`directory` (absolute) when it does not hold converted weights yet; a second conversion into the same
  workdir is refused before any work (the writer would refuse at the end)."""
  directory = os.path.abspath(directory)
  if os.path.isdir(directory) and os.listdir(directory):
    raise FileExistsError(f"{directory} already holds converted weights: convert into a new --workdir (or remove it)")
  return directory


def save_params(directory: str, params: dict) -> None:
  """The converted weights `Checkpointer.restore_params` reads (what `train.init_from`, `model.vq.checkpoint`,
  … name). A NumPy tree is streamed tensor by tensor into `params` safetensors under unimm's '/'-joined
  param paths (`unimm.train.checkpoint.PARAMS_FILES`): nothing beyond the tree itself is held. A tree
  already placed on a mesh (`--shard`) becomes a step-0 orbax checkpoint of that placement, whose save
  holds about a second copy at its peak (bench/convert.py)."""
  import jax  # pylint: disable=g-import-not-at-top
  from unimm.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  from unimm.train import checkpoint  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(params, sep="/")
  if not any(isinstance(v, jax.Array) for v in flat.values()):
    safetensors_io.write_sharded(directory, ((k, np.asarray(v)) for k, v in sorted(flat.items())),
                                 metadata={"format": "unimm-params"})
    checkpoint.mark_params_files(directory)
    return
  import math  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # orbax's limit (whole GB, 10⁹ bytes) must hold the largest array: a 128k × 2048 float32 embedding is 1.05.
  limit = max(1, math.ceil(max(int(v.nbytes) for v in flat.values()) / 1e9))
  with ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False),
                             item_handlers={"state": ocp.StandardCheckpointHandler(save_concurrent_gb=limit)}) as m:
    m.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
    m.wait_until_finished()


def import_vae(source: str, workdir: str) -> dict:
  """A diffusers AutoencoderKL → `WORKDIR/converted_vae` (the KL-VAE's params, `save_params`); returns
  the `config.model.autoencoder` settings that read it (layout diffusers, its pinned scale and shift)."""
  from unimm.convert import diffusers_vae  # pylint: disable=g-import-not-at-top
  directory = _fresh(os.path.join(workdir, CONVERTED_VAE_DIR))
  settings, params = diffusers_vae.load(source)
  save_params(directory, params)
  return {**settings, "checkpoint": directory}


def import_vision(source: str, workdir: str) -> dict:
  """A SigLIP vision tower → `WORKDIR/converted_vision` (the `image_encoder` / `map_head` params a family-siglip
  checkpoint holds); returns the `config.model.vision` overrides that read it (Janus: model.vision.*)."""
  from unimm.convert import siglip  # pylint: disable=g-import-not-at-top
  directory = _fresh(os.path.join(workdir, CONVERTED_VISION_DIR))
  settings, params = siglip.load(source)
  save_params(directory, params)
  keys = ("patch_size", "width", "depth", "num_heads", "mlp_dim", "gelu_exact")
  return {"vision": {**{k: settings[k] for k in keys}, "checkpoint": directory}, "image_size": settings["image_size"]}


def import_any(source: str, workdir: str, base=None, **kwargs) -> dict:
  """Dispatches on what `source` holds: a Llama-kind LM (a workdir), a SigLIP vision tower or a diffusers
  AutoencoderKL (converted weights and the config overrides that read them)."""
  from unimm.convert import llama  # pylint: disable=g-import-not-at-top
  hf = _hf_config(source)
  model_type, class_name = hf.get("model_type"), hf.get("_class_name")
  if model_type == "chameleon":
    return import_chameleon(source, workdir, base, **kwargs)
  if model_type in llama.ARCHITECTURES:
    return import_lm(source, workdir, base, **kwargs)
  if model_type == "janus":
    return import_janus(source, workdir, base, **kwargs)
  if model_type in ("siglip_vision_model", "siglip"):
    return import_vision(source, workdir)
  if class_name == "AutoencoderKL":
    return {"autoencoder": import_vae(source, workdir)}
  raise ValueError(f"{source}: model_type {model_type!r} / _class_name {class_name!r}; unimm.convert imports "
                   f"{llama.ARCHITECTURES} (Chameleon: its language model), janus, siglip_vision_model and "
                   "diffusers' AutoencoderKL")


def place_for_mesh(config, params: dict, vocab: int | None) -> dict:
  """`params` (NumPy) moved leaf by leaf onto the shardings `config`'s mesh and rules give them (each NumPy
  leaf dropped once placed: one full copy at a time)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from unimm.parallel import sharding  # pylint: disable=g-import-not-at-top
  from unimm.train import setup  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  targets = sharding.logical_shardings(setup.abstract_params(config, vocab), mesh,
                                       sharding.logical_rules(config.sharding))
  flat_targets = traverse_util.flatten_dict(targets, sep="/")
  flat = traverse_util.flatten_dict(params, sep="/")
  for path in list(flat):
    flat[path] = jax.device_put(flat.pop(path), flat_targets[path])
  return traverse_util.unflatten_dict(flat, sep="/")


def import_lm(source: str, workdir: str, base=None, *, seq_len: int = 2048, scan: bool = True,
              vae: str | None = None, shard: bool = False) -> dict:
  """Hugging Face LM directory (and optionally a diffusers VAE) → unimm workdir; returns a summary (what the
  command prints)."""
  import configs.common as common  # pylint: disable=g-import-not-at-top
  from unimm.convert import llama  # pylint: disable=g-import-not-at-top
  from unimm.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from unimm.train import config_record  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  _fresh(os.path.join(workdir, CONVERTED_DIR))
  hf = _hf_config(source)
  if hf.get("model_type") not in llama.ARCHITECTURES:
    raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not a language model unimm.convert imports "
                     f"({llama.ARCHITECTURES})")
  has_tokenizer = os.path.exists(os.path.join(source, "tokenizer.json"))
  tokenizer_ids = tokenizer_lib.HFTokenizer.load(source).vocab_size if has_tokenizer else None
  spec, params = llama.load(source, seq_len=seq_len, scan=scan)
  config = workdir_config(base or common.base_config("transfusion"), spec, source, tokenizer_ids, seq_len, scan)
  params = grow_vocabulary(params, int(config.model.vocab_size))
  config.train.init_from = os.path.join(os.path.abspath(workdir), CONVERTED_DIR)
  os.makedirs(workdir, exist_ok=True)
  if vae:
    if "autoencoder" not in config.model:
      raise ValueError(f"--vae needs a Transfusion config (family {config.model.family!r} has no autoencoder)")
    config.model.autoencoder.update(import_vae(vae, workdir))
  count = sum(int(np.prod(np.shape(v))) for v in traverse_util.flatten_dict(params).values())
  placement = None
  if shard:
    params = place_for_mesh(config, params, tokenizer_ids)
    placement = {"devices": int(params["embed"]["embedding"].sharding.num_devices),
                 "embed/embedding": str(params["embed"]["embedding"].sharding.spec)}
  save_params(config.train.init_from, params)
  config_record.write_record(workdir, config_record.make_record(config))
  summary = {"workdir": workdir, "model_type": spec.model_type, "params": count,
             "vocab": [spec.vocab_size, int(config.model.vocab_size)], "tokenizer": bool(has_tokenizer),
             "seconds": round(time.time() - t0, 2), **({"placement": placement} if placement else {})}
  if not has_tokenizer:
    logging.warning("%s has no tokenizer.json: set --config.data.tokenizer.path before training or sampling "
                    "(scoring token ids needs none).", source)
  return summary


def _image_roles(config, source: str, markers: dict) -> int | None:
  """Maps the roles of `markers` ({role: token}) the source's tokenizer.json has into
  `config.data.tokenizer.special_tokens`; returns the tokenizer's id count (None: no tokenizer.json)."""
  from unimm.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(source, "tokenizer.json")):
    return None
  vocabulary = tokenizer_lib.HFTokenizer.load(source).vocabulary()
  roles = {role: token for role, token in markers.items() if token in vocabulary}
  config.data.tokenizer.special_tokens.update(roles)
  return tokenizer_lib.HFTokenizer.load(source, roles).vocab_size


def _code_family_config(workdir: str, base, family: str, vae: str | None):
  """The config a `family` checkpoint converts into (`base`, else the family's base config), once the
  workdir is known to hold no converted weights; refuses `--vae` (code families write codes, not latents)."""
  import configs.common as common  # pylint: disable=g-import-not-at-top
  if vae:
    raise ValueError(f"--vae is for Transfusion workdirs; {family} writes its images with its own VQ tokenizer")
  _fresh(os.path.join(workdir, CONVERTED_DIR))
  _fresh(os.path.join(workdir, CONVERTED_VQ_DIR))
  config = base or common.base_config(family)
  if config.model.family != family:
    raise ValueError(f"a {family} checkpoint converts into a family-{family} config, not {config.model.family!r}")
  return config


def _write_code_family(workdir: str, config, params: dict, vq_params: dict, vq_settings: dict,
                       tokenizer_ids: int | None, shard: bool) -> int:
  """Writes a converted code-family workdir: the frozen tokenizer (`converted_vq/`, `model.vq.checkpoint`),
  the model (`converted/`, `train.init_from`; placed on the config's mesh when `shard`), config.json.
  Returns the model's parameter count."""
  from unimm.train import config_record  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  vq_dir = os.path.join(os.path.abspath(workdir), CONVERTED_VQ_DIR)
  config.model.vq.update(vq_settings, checkpoint=vq_dir)
  config.train.init_from = os.path.join(os.path.abspath(workdir), CONVERTED_DIR)
  save_params(vq_dir, {"vq": vq_params})
  count = sum(int(np.prod(np.shape(v))) for v in traverse_util.flatten_dict(params).values())
  if shard:
    params = place_for_mesh(config, params, tokenizer_ids)
  save_params(config.train.init_from, params)
  config_record.write_record(workdir, config_record.make_record(config))
  return count


def import_chameleon(source: str, workdir: str, base=None, *, seq_len: int = 4096, scan: bool = True,
                     vae: str | None = None, shard: bool = False) -> dict:
  """A transformers `ChameleonForConditionalGeneration` directory → a Chameleon-family workdir:
  `converted/` (the LM over unimm's joint vocabulary: text ids, then code c at `text_vocab + c` with the
  row of its BPE id), `converted_vq/` (the VQGAN's encoder, quant convs and codebook; transformers has no
  decoder, so the decoder starts fresh: train it with family vq before decoding images), config.json,
  and `hf_config.json` (the source's config, which export writes back with the vocabulary map)."""
  import shutil  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from unimm.convert import chameleon, llama, safetensors_io  # pylint: disable=g-import-not-at-top
  from unimm.models import vq as vq_lib  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  config = _code_family_config(workdir, base, "chameleon", vae)
  settings = chameleon.read_settings(_hf_config(source), seq_len)
  spec = settings["spec"]
  tokenizer_ids = _image_roles(config, source, chameleon.SPECIAL_TOKENS)
  config = workdir_config(config, spec, source, tokenizer_ids, seq_len, scan)
  config.model.backbone.bidirectional_images = False
  config.model.image_token_range = settings["image_token_range"]
  vq = vq_lib.VQConfig(**settings["vq"])
  config.data.image_size = settings["image_size"]
  config.data.image_slots = vq.num_codes((settings["image_size"],) * 2)
  reader = safetensors_io.CheckpointReader(source)
  vq_params = chameleon.import_vq(reader, len(vq.channel_mults))
  image = np.zeros((1, settings["image_size"], settings["image_size"], int(config.data.image_channels)), np.uint8)
  fresh = nn.unbox(vq_lib.VQModel(vq, image.shape[-1]).init(jax.random.key(int(config.seed)), image)["params"])
  vq_params["decoder"] = jax.tree.map(np.asarray, fresh["decoder"])
  params = chameleon.codes_into_vocabulary(llama.import_params(reader, spec, scan=scan), settings["code_ids"],
                                           int(config.model.vocab_size))
  count = _write_code_family(workdir, config, params, vq_params, settings["vq"], tokenizer_ids, shard)
  shutil.copy(os.path.join(source, "config.json"), os.path.join(workdir, "hf_config.json"))
  return {"workdir": workdir, "model_type": "chameleon", "params": count,
          "vocab": [spec.vocab_size, int(config.model.vocab_size)], "codes": len(settings["code_ids"]),
          "tokenizer": tokenizer_ids is not None, "vq_decoder": "fresh (transformers ships none)",
          "seconds": round(time.time() - t0, 2)}


def import_janus(source: str, workdir: str, base=None, *, seq_len: int = 4096, scan: bool = True,
                 vae: str | None = None, shard: bool = False) -> dict:
  """A transformers Janus / Janus-Pro directory → a Janus-family workdir: `converted/` (language model, ViT,
  adaptors, generation embeddings and head), `converted_vq/` (the frozen VQ tokenizer, as a family-vq run
  holds it), config.json (`base`, default the Janus base config, with the checkpoint's sizes, switches and
  tokenizer; `--config=configs/janus/pro_1b.py:stage2` keeps a recipe's data mix and schedule)."""
  from unimm.convert import janus  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  config = _code_family_config(workdir, base, "janus", vae)
  settings, params, vq_params = janus.load(source, seq_len=seq_len, scan=scan)
  spec = settings["spec"]
  tokenizer_ids = _image_roles(config, source, janus.SPECIAL_TOKENS)
  config = workdir_config(config, spec, source, tokenizer_ids, seq_len, scan)
  config.model.backbone.bidirectional_images = False
  config.model.vision.update(settings["vision"], checkpoint="")
  config.model.adaptor_gelu_exact = settings["adaptor_gelu_exact"]
  config.data.image_size = settings["image_size"]
  config.data.image_slots = (settings["image_size"] // settings["vision"]["patch_size"]) ** 2
  with config.unlocked():
    config.hf.image_token_id = settings["image_token_id"]  # the text model's keys, and Janus's placeholder
  rows = int(config.model.vocab_size)
  params = grow_vocabulary(params, rows)
  count = _write_code_family(workdir, config, params, vq_params, settings["vq"], tokenizer_ids, shard)
  return {"workdir": workdir, "model_type": "janus", "params": count, "vocab": [spec.vocab_size, rows],
          "tokenizer": tokenizer_ids is not None, "seconds": round(time.time() - t0, 2)}


def export_spec(config, tokenizer_ids: int | None, *, chameleon: bool = False):
  """The Hugging Face LM a unimm config's text model is; refuses, by name, what the format cannot hold
  (`chameleon`: Chameleon's, whose per-head LayerNorm QK-norm and Swin norm order it can)."""
  from unimm.convert import llama  # pylint: disable=g-import-not-at-top
  b = config.model.backbone
  chameleon_norm = chameleon and b.get("qk_norm_kind", "rms") == "head_layernorm"
  unsupported = {"qk_norm": b.qk_norm and not chameleon_norm,
                 "norm_order": b.norm_order not in (("pre", "swin") if chameleon else ("pre",)),
                 "mot": tuple(b.get("mot", ())), "dropout": float(b.dropout) > 0}
  refused = [k for k, v in unsupported.items() if v]
  if refused:
    raise ValueError(f"the backbone's {refused} ({', '.join(f'{k}={b[k]!r}' for k in refused)}) cannot be written "
                     "as a Llama/Qwen2 checkpoint (Hugging Face's have no such option); export refuses rather than "
                     "drop it")
  hf = config.get("hf") or {}
  source_vocab = int(hf.get("vocab_size", 0))
  vocab = max(source_vocab, tokenizer_ids or 0) or int(config.model.vocab_size)
  keys = ("num_layers", "dim", "num_heads", "num_kv_heads", "head_dim", "mlp_hidden", "norm_eps", "qkv_bias",
          "qk_norm", "qk_norm_kind", "norm_order", "rope_theta", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
          "rope_high_freq_factor", "rope_original_max_positions")
  from unimm.models import backbone as backbone_lib  # pylint: disable=g-import-not-at-top
  defaults = dataclasses.asdict(backbone_lib.BackboneConfig(1, 1, 1))  # keys a workdir from before them lacks
  backbone = {k: b.get(k, defaults[k]) for k in keys}
  backbone["num_kv_heads"] = backbone["num_kv_heads"] or backbone["num_heads"]
  backbone["head_dim"] = backbone["head_dim"] or backbone["dim"] // backbone["num_heads"]
  if not backbone["mlp_hidden"]:
    from unimm.models import layers  # pylint: disable=g-import-not-at-top
    backbone["mlp_hidden"] = layers.mlp_hidden(backbone["dim"])
  model_type = hf.get("model_type") or ("qwen2" if b.qkv_bias else "llama")
  if b.qkv_bias and model_type != "qwen2":
    raise ValueError(f"q/k/v biases export as qwen2, but the source was {model_type!r}")
  special = {k: (None if int(hf.get(f"{k}_token_id", -1)) < 0 else int(hf[f"{k}_token_id"]))
             for k in ("bos", "eos", "pad")}
  window = int(hf.get("sliding_window", -1))
  return llama.LMSpec(model_type, vocab, backbone, bool(hf.get("tied_embeddings", False)),
                      str(hf.get("torch_dtype", "float32")), special, int(hf.get("max_positions", config.data.seq_len)),
                      None if window < 0 else window)


def export(workdir: str, out: str, *, dtype: str | None = None, max_shard_bytes: int = 5 * 2 ** 30) -> dict:
  """The workdir's model (its latest checkpoint, else its converted weights) → a Hugging Face directory: a
  Janus workdir as `JanusForConditionalGeneration`, any other family's text model as a Llama-kind LM (with
  what it holds besides: `export_beside`)."""
  from unimm.train import config_record  # pylint: disable=g-import-not-at-top
  config = config_record.load_config(workdir)
  if config.model.family == "janus":
    return export_janus(config, workdir, out, dtype=dtype, max_shard_bytes=max_shard_bytes)
  if config.model.family == "chameleon":
    return export_chameleon(config, workdir, out, dtype=dtype, max_shard_bytes=max_shard_bytes)
  if config.model.family == "siglip":
    return export_siglip(config, workdir, out, max_shard_bytes=max_shard_bytes)
  return export_lm(workdir, out, dtype=dtype, max_shard_bytes=max_shard_bytes)


def _tokenizer_ids(config) -> int | None:
  """How many ids the workdir's tokenizer emits (None: it has none on this machine)."""
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    return pipeline.load_tokenizer(config.data).vocab_size
  except (FileNotFoundError, OSError):
    return None


def _text_model(config, workdir: str):
  """(spec, params as NumPy with padding rows dropped, step) of the workdir's text model."""
  spec = export_spec(config, _tokenizer_ids(config))
  params, step = trained_or_converted_params(config, workdir)
  params = _to_numpy(params)
  params["embed"]["embedding"] = params["embed"]["embedding"][:spec.vocab_size]  # padding rows dropped
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"][:, :spec.vocab_size]
  return spec, params, step


def _frozen_tokenizer(config) -> dict:
  """A code family's frozen VQ tokenizer params (`model.vq.checkpoint`) as NumPy."""
  from unimm import families  # pylint: disable=g-import-not-at-top
  params = families.load_vq_tokenizer(config)
  if params is None:
    raise ValueError(f"family {config.model.family} names no model.vq.checkpoint: its VQ tokenizer cannot be exported")
  return _to_numpy(params)


def _write_hf(out: str, tensors, hf_config: dict, max_shard_bytes: int) -> list[str]:
  """A Hugging Face directory: `tensors` streamed into safetensors, and `hf_config` as config.json."""
  from unimm.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  files = safetensors_io.write_sharded(out, tensors, max_shard_bytes)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  return files


def _copy_tokenizer(config, out: str) -> None:
  """The tokenizer travels with the model."""
  import shutil  # pylint: disable=g-import-not-at-top
  if os.path.isdir(str(config.data.tokenizer.path)):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
      src = os.path.join(config.data.tokenizer.path, name)
      if os.path.exists(src):
        shutil.copy(src, os.path.join(out, name))


def export_lm(workdir: str, out: str, *, dtype: str | None = None, max_shard_bytes: int = 5 * 2 ** 30) -> dict:
  """The workdir's text model (its latest checkpoint, else its converted weights) → a Hugging Face LM."""
  from unimm.convert import llama  # pylint: disable=g-import-not-at-top
  from unimm.train import config_record  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  config = config_record.load_config(workdir)
  spec, params, step = _text_model(config, workdir)
  extra = {k: v for k, v in params.items() if k not in ("embed", "decoder", "lm_head")}
  files = llama.save(params, spec, out, scan=bool(config.model.backbone.scan), dtype=dtype,
                     max_shard_bytes=max_shard_bytes)
  _copy_tokenizer(config, out)
  beside = export_beside(config, extra, out)
  return {"out": out, "model_type": spec.model_type, "step": step, "vocab": spec.vocab_size, "files": files,
          **beside, "seconds": round(time.time() - t0, 2)}


def export_janus(config, workdir: str, out: str, *, dtype: str | None = None,
                 max_shard_bytes: int = 5 * 2 ** 30) -> dict:
  """A Janus workdir → a `JanusForConditionalGeneration` directory (its frozen VQ tokenizer included)."""
  from unimm.convert import janus, llama  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  spec, params, step = _text_model(config, workdir)
  dtype = dtype or spec.torch_dtype
  hf = janus.hf_config(config, spec, dtype=dtype)  # refuses before anything is written
  vq_params = _frozen_tokenizer(config)
  files = _write_hf(out, janus.export_tensors(params, vq_params, spec, config, scan=bool(config.model.backbone.scan),
                                              dtype=llama.numpy_dtype(dtype)), hf, max_shard_bytes)
  _copy_tokenizer(config, out)
  return {"out": out, "model_type": "janus", "step": step, "vocab": spec.vocab_size, "files": files,
          "seconds": round(time.time() - t0, 2)}


def export_chameleon(config, workdir: str, out: str, *, dtype: str | None = None,
                     max_shard_bytes: int = 5 * 2 ** 30) -> dict:
  """A Chameleon workdir converted from transformers → a `ChameleonForConditionalGeneration` directory: each
  code's row back at its BPE id, the VQ encoder, quant convs and codebook (not unimm's decoder), the source's
  config.json with the sizes unimm may have changed."""
  from unimm.convert import chameleon, llama  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  source_config = os.path.join(workdir, "hf_config.json")
  if not os.path.exists(source_config):
    raise ValueError(f"{workdir} was not converted from a transformers Chameleon (no hf_config.json): its "
                     "vocabulary has no BPE ids for the codes to export to")
  hf = _hf_config_file(source_config)
  settings = chameleon.read_settings(hf, int(config.data.seq_len))
  spec = export_spec(config, _tokenizer_ids(config), chameleon=True)
  params, step = trained_or_converted_params(config, workdir)
  params = chameleon.codes_out_of_vocabulary(_to_numpy(params), settings["code_ids"], int(config.model.vocab_size),
                                             spec.vocab_size)
  dtype = dtype or spec.torch_dtype
  vq_params = _frozen_tokenizer(config)
  cast = llama.numpy_dtype(dtype)
  spec = dataclasses.replace(spec, tied_embeddings=spec.tied_embeddings and llama.heads_tied(params))

  def tensors():
    yield from llama.export_tensors(params, spec, scan=bool(config.model.backbone.scan), dtype=cast)
    for name, a in chameleon.export_vq(vq_params, len(config.model.vq.channel_mults)):
      yield name, np.ascontiguousarray(a.astype(cast))

  b = spec.backbone
  hf.update(vocab_size=spec.vocab_size, hidden_size=b["dim"], intermediate_size=b["mlp_hidden"],
            num_hidden_layers=b["num_layers"], num_attention_heads=b["num_heads"],
            num_key_value_heads=b["num_kv_heads"], rms_norm_eps=b["norm_eps"], torch_dtype=dtype,
            tie_word_embeddings=spec.tied_embeddings)
  files = _write_hf(out, tensors(), hf, max_shard_bytes)
  _copy_tokenizer(config, out)
  return {"out": out, "model_type": "chameleon", "step": step, "vocab": spec.vocab_size, "files": files,
          "vq_decoder": "not exported (transformers' Chameleon has none)", "seconds": round(time.time() - t0, 2)}


def export_siglip(config, workdir: str, out: str, *, max_shard_bytes: int = 5 * 2 ** 30) -> dict:
  """A family-siglip workdir's ViT and MAP head → a `SiglipVisionModel` directory (the text tower, which
  transformers' vision model does not hold, is not exported)."""
  from unimm.convert import siglip  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  if int(config.model.vision.get("feature_layer", -1)) != -1:
    raise ValueError(f"model.vision.feature_layer={config.model.vision.feature_layer}: a SiglipVisionModel's "
                     "features are its last block's, final-normed")
  params, step = trained_or_converted_params(config, workdir)
  params = _to_numpy(params)

  def tensors():
    yield from siglip.export_tensors(params["image_encoder"], prefix="")  # as SiglipVisionModel saves itself
    if "map_head" in params:
      yield from siglip.export_head(params["map_head"], prefix="")

  hf = siglip.hf_config(config.model.vision, int(config.data.image_size), int(config.data.image_channels),
                        "map_head" in params)
  files = _write_hf(out, tensors(), hf, max_shard_bytes)
  return {"out": out, "model_type": "siglip_vision_model", "step": step, "files": files,
          "seconds": round(time.time() - t0, 2)}


def export_beside(config, extra: dict, out: str) -> dict:
  """What a family holds besides its text model: a diffusers-layout VAE as an AutoencoderKL in OUT/vae,
  and the other params (Transfusion's patch and timestep layers, …) in unimm's layout in
  OUT/unimm_image_layers.safetensors (names are '/'-joined param paths)."""
  from unimm.convert import diffusers_vae, safetensors_io  # pylint: disable=g-import-not-at-top
  from unimm.train import checkpoint  # pylint: disable=g-import-not-at-top
  written = {}
  if extra:
    flat = sorted(traverse_util.flatten_dict(_to_numpy(extra), sep="/").items())
    safetensors_io.write_file(os.path.join(out, "unimm_image_layers.safetensors"),
                              [(k, v.astype(np.float32)) for k, v in flat], {"format": "unimm"})
    written["image_layers"] = len(flat)
  ae = config.model.get("autoencoder")
  if ae is not None and ae.kind == "kl_vae":
    if ae.get("layout", "unimm") != "diffusers":
      logging.warning("The KL-VAE is in unimm's own layout, which diffusers has no class for: not exported.")
    elif ae.checkpoint:
      vae_params = checkpoint.Checkpointer(ae.checkpoint, async_save=False).restore_params()
      diffusers_vae.save(_to_numpy(vae_params), dict(ae), os.path.join(out, "vae"), int(config.data.image_channels))
      written["vae"] = os.path.join(out, "vae")
  return written


def _to_numpy(tree):
  return traverse_util.unflatten_dict({k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()})


def trained_or_converted_params(config, workdir: str):
  """(params, step): the workdir's latest training checkpoint; before training wrote one, the weights
  `train.init_from` names (step None)."""
  from unimm.train import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = ckpt.latest_step()
  if step is not None:
    return ckpt.restore_params(step), step
  if not config.train.init_from:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints and no train.init_from: nothing to export")
  return checkpoint.Checkpointer(config.train.init_from, async_save=False).restore_params(), None
