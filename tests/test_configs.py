"""Configs load, and the paper sizes have the paper's parameter counts (never materialised)."""

import functools
import importlib

import jax
import numpy as np
import pytest

from conftest import load_config
from unimm import families

PAPER_SIZES = {  # Transfusion Table 2, in billions
    "configs/transfusion/160m.py": 0.16,
    "configs/transfusion/370m.py": 0.37,
    "configs/transfusion/760m.py": 0.76,
    "configs/transfusion/1_4b.py": 1.4,
    "configs/transfusion/7b.py": 7.0,
}


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("path,billions", sorted(PAPER_SIZES.items()))
def test_paper_parameter_counts(path, billions):
  config = load_config(path)
  task = families.build_task(config, vocab_size=0, frozen_codec={})
  batch = task.dummy_batch(1, 64, (256, 256, 3))
  params = jax.eval_shape(task.init, jax.random.key(0), batch)
  backbone = count(params["decoder"]) + count(params["embed"]) + count(params["lm_head"])
  assert abs(backbone / 1e9 - billions) / billions < 0.05, backbone
  # The slots per 256-px image: latent 32×32 in 2×2 patches.
  assert config.data.image_slots == 256 and task.model.slots == 256


@pytest.mark.parametrize("arg", ["shapes", "digits"])
def test_tiny_configs(arg):
  config = load_config("configs/transfusion/tiny.py", arg)
  assert config.data.image_slots == 16  # shapes: 32×32 pixels in 8×8 patches; digits: 8×8 in 2×2
  assert config.model.patch_position == ("sincos" if arg == "shapes" else "none")
  with pytest.raises(ValueError, match="shapes"):
    load_config("configs/transfusion/tiny.py", "cifar")


@pytest.mark.parametrize("name", ["objective", "prediction", "flow_head", "shift", "weights", "ema", "lr", "patches"])
def test_tiny_sweeps_name_keys_the_config_has(name):
  """Each member of tiny.py's sweeps sets keys the config holds (a misspelt one would fail only at launch)."""
  tiny = importlib.import_module("configs.transfusion.tiny")
  for overrides in tiny.get_sweep(name):
    config = load_config("configs/transfusion/tiny.py")
    for key, value in overrides.items():
      *parents, leaf = key.split(".")
      node = functools.reduce(lambda n, p: n[p], parents, config)
      assert leaf in node, key
      node[leaf] = value
    if name == "patches":  # the slots follow the patch side
      assert config.data.image_slots == (32 // config.model.patch_size) ** 2


def test_chameleon_7b_shape():
  """Chameleon-7B: 7B parameters, 65,536-token vocabulary of which 8,192 are codes, 1,024 codes per image."""
  config = load_config("configs/chameleon/7b.py")
  task = families.build_task(config, vocab_size=0, frozen_codec={})
  batch = task.dummy_batch(1, 64, (512, 512, 3))
  params = jax.eval_shape(task.init, jax.random.key(0), batch)
  assert abs(count(params) / 1e9 - 7.0) / 7.0 < 0.05, count(params)
  assert params["embed"]["embedding"].value.shape[0] == 65_536 and task.codes.codebook_size == 8192
  assert task.codes.text_vocab == 57_344
  assert task.model.slots == 1024 and config.model.backbone.qk_norm and config.model.z_loss == 1e-5


@pytest.mark.parametrize("path,arg,slots", [("configs/chameleon/tiny.py", "shapes", 64),
                                            ("configs/chameleon/tiny.py", "digits", 16),
                                            ("configs/tokenizers/tiny.py", "shapes", 64),
                                            ("configs/tokenizers/tiny.py", "shapes16", 16),
                                            ("configs/tokenizers/tiny.py", "digits", 16)])
def test_code_family_configs(path, arg, slots):
  config = load_config(path, arg)
  task = families.build_task(config, vocab_size=150, frozen_codec={})
  assert config.data.image_slots == slots
  if config.model.family == "chameleon":
    assert task.model.slots == slots and not config.model.backbone.bidirectional_images
    # The tiny Chameleon reads its tokenizer with the tiny tokenizer config's architecture.
    tokenizer = load_config("configs/tokenizers/tiny.py", arg)
    assert config.model.vq.to_dict() == tokenizer.model.vq.to_dict()


def test_chameleon_needs_a_tokenizer():
  config = load_config("configs/chameleon/tiny.py")
  with pytest.raises(ValueError, match="vq.checkpoint"):
    families.build_task(config, vocab_size=150)


@pytest.mark.parametrize("path,llm_billions", [("configs/janus/pro_1b.py", (1.4, 1.8)),
                                               ("configs/janus/pro_7b.py", (6.7, 7.1))])
def test_janus_pro_shapes(path, llm_billions):
  """Janus-Pro: DeepSeek-LLM backbone (102,400 ids), SigLIP-L/16 at 384 px (0.30B), 576 slots per image read
  (24×24 patches) or written (24×24 codes of a 16,384 codebook), image head to the codebook."""
  for stage in ("stage1", "stage2", "stage3"):
    config = load_config(path, stage)
    task = families.build_task(config, vocab_size=0,
                               frozen_codec={"quantizer": {"codebook": np.zeros((16_384, 8), np.float32)}})
    assert task.model.slots == 576 == config.data.image_slots and config.data.image_size == 384
  params = jax.eval_shape(task.init, jax.random.key(0), task.dummy_batch(1, 64, (384, 384, 3)))
  llm = count(params["decoder"]) + count(params["embed"]) + count(params["lm_head"])
  assert llm_billions[0] < llm / 1e9 < llm_billions[1], llm
  assert abs(count(params["vision_encoder"]) / 1e9 - 0.303) < 0.01, count(params["vision_encoder"])
  assert params["embed"]["embedding"].value.shape[0] == 102_400
  assert params["gen_head"]["fc2"]["kernel"].value.shape[-1] == 16_384 and params["gen_embed"].value.shape == (16_384, 8)
  assert config.train.trainable[-1] == "vision_encoder" and config.model.guidance == 5.0


@pytest.mark.parametrize("arg", ["stage1", "stage2", "stage3", "digits_stage1"])
def test_janus_tiny_stages(arg):
  """Each stage names what trains and its understanding : text : generation mix."""
  config = load_config("configs/janus/tiny.py", arg)
  dataset = "digits" if arg.startswith("digits") else "shapes"
  s = config.data.sources
  mix = (s[dataset + "_understanding"].weight, s[dataset + "_text"].weight, s[dataset].weight)
  assert mix == {"stage1": (1, 0, 3), "stage2": (2, 3, 5), "stage3": (5, 1, 4)}[arg[-6:]]
  assert ("vision_encoder" in config.train.trainable) == arg.endswith("3")
  assert ("decoder" in config.train.trainable) == (not arg.endswith("1"))
  assert config.data.caption_dropout_mode == "pad" and not config.data.train_read_images
  assert config.model.guidance == 5.0
  codebook = config.model.vq.codebook_size
  task = families.build_task(config, vocab_size=150, frozen_codec={"quantizer": {"codebook": np.zeros((codebook, 8))}})
  assert task.model.slots == task.model.vision.num_patches(task.image_shape) == (16 if dataset == "digits" else 64)
  # The tiny Janus reads with the tiny SigLIP's ViT.
  assert config.model.vision.to_dict() == load_config("configs/siglip/tiny.py", dataset).model.vision.to_dict()
  with pytest.raises(ValueError, match="stageN"):
    load_config("configs/janus/tiny.py", "stage4")


PAPER_CONFIGS = [("configs/transfusion/160m.py", ""), ("configs/transfusion/370m.py", ""),
                 ("configs/transfusion/760m.py", ""), ("configs/transfusion/1_4b.py", ""),
                 ("configs/transfusion/7b.py", ""), ("configs/chameleon/7b.py", ""),
                 *[(f"configs/janus/pro_{size}.py", f"stage{n}") for size in ("1b", "7b") for n in (1, 2, 3)]]
# What a smoke variant must keep of its recipe (everything but sizes).
STRUCTURAL = ["model.family", "model.autoencoder.kind", "model.autoencoder.latent_channels", "model.patch_kind",
              "model.patch_size", "model.objective", "model.prediction", "model.diffusion_weight", "model.num_timesteps", "model.z_loss",
              "model.guidance", "model.backbone.qk_norm", "model.backbone.dropout", "model.backbone.norm_order",
              "model.backbone.bidirectional_images", "model.backbone.attention", "model.backbone.remat",
              "model.backbone.scan", "model.backbone.dtype", "model.vq.code_dim", "model.vq.l2_normalized",
              "model.vision.feature_layer", "data.tokenizer.model_type", "data.tokenizer.builtin_specials",
              "data.mix_by", "data.caption_dropout", "data.caption_dropout_mode", "data.caption_first_prob",
              "data.image_token_weight", "data.train_read_images", "data.split_long_documents", "train.b1",
              "train.b2", "train.eps", "train.grad_clip", "train.weight_decay", "train.wd_mults", "train.trainable",
              "train.grad_accum_steps", "mesh", "targets"]


def lookup(config, dotted: str):
  for key in dotted.split("."):
    if key not in config:
      return None  # another family's key
    config = config[key]
  return config.to_dict() if hasattr(config, "to_dict") else config


@pytest.mark.parametrize("path,stage", PAPER_CONFIGS)
def test_smoke_variants_keep_the_recipe_and_build(path, stage):
  from unimm.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
  recipe = load_config(path, stage or None)
  smoke = load_config(path, f"{stage}_smoke" if stage else "smoke")
  for key in STRUCTURAL:
    assert lookup(smoke, key) == lookup(recipe, key), key
  views = lambda c: {name: (float(s.weight), bool(s.get("text_only", False))) for name, s in c.data.sources.items()}
  assert views(smoke) == views(recipe)  # the same mix of the same kinds of data
  for name, source in recipe.data.sources.items():  # pair order a recipe fixes (Janus's generation/understanding)
    if source.get("caption_first_prob") is not None:
      assert smoke.data.sources[name].caption_first_prob == source.caption_first_prob, name
  shape = lambda t: (float(t.final_learning_rate) / float(t.learning_rate), int(t.warmup_steps) > 0)
  assert shape(smoke.train) == shape(recipe.train)  # the schedule's shape: warm-up or not, final / peak
  assert int(recipe.model.vocab_size) % 128 == 0 and int(smoke.model.vocab_size) % 128 == 0
  assert smoke.model.backbone.dim < 100 and smoke.train.num_steps >= 20 and smoke.data.image_size == 32
  params = setup_lib.abstract_params(smoke, None)
  assert 1e5 < count(params) < 3e6, count(params)  # trains in seconds a step on 2 CPU cores


# docs/scaling.md's targets: (chips, platform) → the remat policy and microbatches the bare config resolves to.
FITTING_DEFAULTS = {
    ("configs/transfusion/1_4b.py", ""): {(128, "tpu"): ("dots_no_batch", 1), (64, "gpu"): ("dots_no_batch", 1)},
    ("configs/transfusion/7b.py", ""): {(128, "tpu"): ("dots_no_batch", 1), (64, "gpu"): ("qkv_proj", 1)},
    ("configs/chameleon/7b.py", ""): {(128, "tpu"): ("dots_no_batch", 1), (64, "gpu"): ("qkv_proj", 1)},
    ("configs/janus/pro_7b.py", "stage2"): {(128, "tpu"): ("dots_no_batch", 1), (64, "gpu"): ("qkv_proj", 2)},
    ("configs/janus/pro_7b.py", "stage1"): {(64, "gpu"): ("qkv_proj", 1)},
    ("configs/janus/pro_7b.py", "stage3"): {(64, "gpu"): ("qkv_proj", 1), (256, "gpu"): ("qkv_proj", 1)},
}


@pytest.mark.parametrize("path,stage", sorted(FITTING_DEFAULTS))
def test_paper_defaults_are_the_fitting_strategy(path, stage):
  """The bare config (no overrides) is FSDP over every device with the remat and accumulation that fit each
  target of docs/scaling.md; explicit values are kept."""
  import types  # pylint: disable=g-import-not-at-top
  from unimm.parallel import sharding  # pylint: disable=g-import-not-at-top
  from unimm.parallel import targets  # pylint: disable=g-import-not-at-top
  config = load_config(path, stage or None)
  for (chips, platform), (remat, accum) in FITTING_DEFAULTS[(path, stage)].items():
    shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, chips)))
    assert shape == {"data": 1, "fsdp": chips, "tensor": 1, "sequence": 1}
    mesh = types.SimpleNamespace(shape=shape)
    resolved = targets.resolve_targets(config, platform, targets.rows_per_device(config, mesh))
    assert (resolved.model.backbone.remat, resolved.train.grad_accum_steps) == (remat, accum), (chips, platform)
  config.model.backbone.remat, config.train.grad_accum_steps = "full", 4
  kept = targets.resolve_targets(config, "gpu", 8)
  assert (kept.model.backbone.remat, kept.train.grad_accum_steps) == ("full", 4)


# One per family at paper size (Janus-Pro-7B through the CLI below), and the tiny ones.
ALL_CONFIGS = [("configs/transfusion/7b.py", ""), ("configs/chameleon/7b.py", ""), ("configs/transfusion/tiny.py", "shapes_vae"), ("configs/chameleon/tiny.py", ""),
               ("configs/janus/tiny.py", "stage3"), ("configs/siglip/tiny.py", ""), ("configs/tokenizers/tiny.py", ""),
               ("configs/vae/shapes.py", "")]


@pytest.mark.parametrize("path,arg", ALL_CONFIGS)
def test_param_table_of_every_config(path, arg):
  """--mode=params' table: one row per parameter, totals that add up, the split the FLOP count uses."""
  from unimm.train import param_table, setup as setup_lib  # pylint: disable=g-import-not-at-top
  config = load_config(path, arg or None)
  vocab = None if int(config.model.vocab_size) else 128
  rows = param_table.param_rows(config, vocab, 64)
  totals = param_table.summary(rows, {})
  assert totals["total"] == count(setup_lib.abstract_params(config, vocab)) == sum(r["count"] for r in rows)
  assert totals["matmul"] + totals["non_matmul"] + totals["image_copies"] == totals["total"]
  assert sum(totals["by_module"].values()) == totals["total"] == totals["active"] + totals["image_copies"]
  for r in rows:
    assert len(r["shape"]) == len(r["logical_axes"]) == len(r["partition_spec"]) == len(r["per_device_shape"])
    assert r["weight_decay"] == (1.0 if r["path"].endswith("/kernel") else 0.0)
  if int(config.mesh.fsdp) == -1:  # paper configs: every embed axis split 64 ways
    embed = next(r for r in rows if r["path"] == "embed/embedding")
    assert embed["per_device_shape"][1] * 64 == embed["shape"][1]


def test_params_mode_prints_the_7b_table(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, "-m", "unimm.main", "--mode=params", "--config=configs/janus/pro_7b.py:stage2",
                        "--topology=h100:64", f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "decoder/layers/attn/q/kernel" in out.stdout and "per device on mesh" in out.stdout
  table = json.load(open(tmp_path / "params.json"))
  assert 7.2e9 < table["totals"]["total"] < 7.5e9
  frozen = {r["path"].split("/")[0] for r in table["rows"] if not r["trains"]}
  assert frozen == {"vision_encoder"}  # stage II: the ViT stays frozen


def test_train_and_data_settings_parse_every_config_typed_and_strictly():
  """`config.train` / `config.data` parse once into typed settings; a key they do not know (a typo) or lack fails,
  naming the keys."""
  import ml_collections as mlc  # pylint: disable=g-import-not-at-top
  from unimm.data.settings import DataSettings  # pylint: disable=g-import-not-at-top
  from unimm.train.settings import TrainSettings  # pylint: disable=g-import-not-at-top
  every = [*((p, None) for p in PAPER_SIZES), ("configs/chameleon/7b.py", "smoke"),
           ("configs/janus/pro_7b.py", "stage2"), ("configs/transfusion/tiny.py", "shapes_vae"),
           ("configs/janus/tiny.py", "stage3"), ("configs/siglip/tiny.py", None),
           ("configs/tokenizers/tiny.py", "shapes"), ("configs/vae/shapes.py", None)]
  for path, arg in every:
    config = load_config(path, arg)
    train, data = TrainSettings.from_config(config.train), DataSettings.from_config(config.data)
    assert type(train.num_steps) is int and type(train.learning_rate) is float and type(train.skip_nonfinite) is bool
    assert train.num_steps == config.train.num_steps and train.trainable == tuple(config.train.trainable)
    assert data.seq_len == config.data.seq_len and data.batch_size == config.data.batch_size
    assert data.layout.image_shape == (config.data.image_size, config.data.image_size, config.data.image_channels)
  config = load_config("configs/transfusion/tiny.py", "shapes")
  with pytest.raises(ValueError, match=r"unknown config.train keys \['learning_rte'\]; known: .*'learning_rate'"):
    TrainSettings.from_config(mlc.ConfigDict({**config.train.to_dict(), "learning_rte": 1e-3}))
  with pytest.raises(ValueError, match=r"config.train lacks \['log_every'\]"):
    TrainSettings.from_config(mlc.ConfigDict({k: v for k, v in config.train.items() if k != "log_every"}))
  with pytest.raises(ValueError, match=r"unknown config.data keys \['seq_lne'\]; known: .*'seq_len'"):
    DataSettings.from_config(mlc.ConfigDict({**config.data.to_dict(), "seq_lne": 64}))
  with pytest.raises(ValueError, match=r"config.train.wd_mults entry \('kernel',\)"):
    TrainSettings.from_config(mlc.ConfigDict({**config.train.to_dict(), "wd_mults": (("kernel",),)}))
