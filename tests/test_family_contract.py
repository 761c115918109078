"""The family contract: every registered family's task follows the `Task` protocol its record promises, and
a family defined and registered here (touching no shared file) trains and samples through the shared code."""

import dataclasses
import inspect
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, small_config
from unimm import families, main
from unimm.inference import placement, requests, sampling
from unimm.models import transfusion
from unimm.train import loop

TINY_CONFIGS = {"transfusion": "configs/transfusion/tiny.py", "chameleon": "configs/chameleon/tiny.py",
                "janus": "configs/janus/tiny.py", "kl_vae": "configs/vae/shapes.py",
                "vq": "configs/tokenizers/tiny.py:shapes", "siglip": "configs/siglip/tiny.py:shapes"}
PROTOCOL = ("init", "loss_terms", "loss_counts", "combine", "dummy_batch")


def protocol_parameters(name: str) -> list[str]:
  return [p for p in inspect.signature(getattr(families.Task, name)).parameters if p != "self"]


@pytest.mark.parametrize("name", families.names())
def test_every_registered_family_builds_a_task_that_follows_the_protocol(name):
  assert set(families.names()) == set(TINY_CONFIGS), "a new family needs its tiny config here"
  path, _, arg = TINY_CONFIGS[name].partition(":")
  config = load_config(path, arg or None)
  record = families.of(config)
  assert record.name == name == config.model.family
  codec = jax.eval_shape(lambda: record.random_frozen_codec(config, 0))  # shapes only: nothing compiles
  task = families.build_task(config, 128, frozen_codec=codec)
  assert isinstance(task, families.Task)
  for method in PROTOCOL:  # the protocol's arguments, by name and in order (a bound method drops `self`)
    assert [p for p in inspect.signature(getattr(task, method)).parameters][:len(protocol_parameters(method))] == \
        protocol_parameters(method), (name, method)
  assert record.after_update == callable(getattr(task, "after_update", None)), name
  if record.writes_images:  # what the shared sampling code reads of a task that writes images
    assert record.text_generator is not None and task.model.slots == int(config.data.image_slots)


@dataclasses.dataclass
class EqualWeightsTask(transfusion.TransfusionTask):
  """A family of this test's own: Transfusion's parts (backbone, patches, diffusion), its losses weighted by
  how many targets each covers (text tokens and image patches count alike), not a fixed λ."""

  def combine(self, sums: dict, counts: dict):
    patches_per_image = self.model.latent_shape[0] * self.model.latent_shape[1] // self.model.patch_size ** 2
    text_n, image_n = counts["lm"], counts["diffusion"] * patches_per_image
    total = (sums["lm"] + sums["z"] + sums["diffusion"] * patches_per_image) / jnp.maximum(text_n + image_n, 1.0)
    return total, {"lm_loss": sums["lm"] / jnp.maximum(text_n, 1.0),
                   "diffusion_loss": sums["diffusion"] / jnp.maximum(counts["diffusion"], 1.0)}


def equal_weights_task(config, vocab_size, frozen_codec=None):
  built = families.get("transfusion").build_task(config, vocab_size, frozen_codec)
  return EqualWeightsTask(**{f.name: getattr(built, f.name) for f in dataclasses.fields(built)})


@pytest.fixture
def equal_weights_family():
  """The test's family, registered for the test only; built from the Transfusion record's public parts."""
  record = families.register(dataclasses.replace(families.get("transfusion"), name="equal_weights",
                                                 build_task=equal_weights_task, evaluate=None))
  yield record
  families.unregister(record.name)


def test_a_family_registered_outside_the_library_trains_and_samples(data_dir, tmp_path, equal_weights_family):
  config = small_config(data_dir)
  config.model.family = equal_weights_family.name
  config.model.backbone.update(num_layers=1, dim=32, num_heads=2, mlp_hidden=64)
  config.train.update(num_steps=2, log_every=1, checkpoint_every=2, sample_every=0, eval_every=0,
                      final_eval_examples=0)
  workdir = str(tmp_path / "run")
  result = loop.train(config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2] and np.isfinite(result["loss"])
  assert "z_loss" not in result  # the metrics are the ones its combine names and {"lm_loss", "diffusion_loss"} <= set(result)

  task, params, tokenizer, step = main.load_trained(config, workdir)
  assert step == 2 and isinstance(task, EqualWeightsTask)
  lines = [{"id": "t2i", "parts": [{"text": "a red circle"}], "generate": "image"},
           {"id": "cap", "parts": [{"text": "a"}], "generate": "text", "max_tokens": 3}]
  (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
  manifest = requests.run_requests(
      families.of(config), task, params, tokenizer, requests.parse_requests(str(tmp_path / "r.jsonl"), task.image_shape),
      str(tmp_path / "out"), context=int(config.data.seq_len), rng=jax.random.key(0), sampling=sampling.SamplingOptions(),
      num_steps=2, guidance=3.0, sampler=None, placement=placement.Placement.from_config(config))
  by_id = {r["id"]: r for r in manifest}
  assert not any("error" in r for r in manifest), manifest
  assert os.path.exists(tmp_path / "out" / by_id["t2i"]["image"]) and isinstance(by_id["cap"]["text"], str)


def test_an_unknown_family_names_the_known_ones_and_a_name_is_registered_once():
  with pytest.raises(ValueError, match=r"unknown model family 'nope'; known: \['chameleon', 'janus'"):
    families.get("nope")
  with pytest.raises(ValueError, match="already registered"):
    families.register(families.get("vq"))


def test_every_sampling_option_is_a_flag_for_text_and_for_codes():
  """A new sampling option is a `SamplingOptions` field (and its use in `text.sample_tokens`): the sample
  command's flags are made from the fields, with the text and the code defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  for field in dataclasses.fields(sampling.SamplingOptions):
    for prefix, defaults in (("", sampling.SamplingOptions()), ("code_", sampling.CODE_DEFAULTS)):
      flag = flags.FLAGS[prefix + field.name]
      assert flag.default == getattr(defaults, field.name) and field.metadata["help"] in flag.help


def test_each_config_holds_its_family_keys_only_and_older_records_with_every_family_resume():
  """A family's `model.*` keys come from its record (`config_defaults`): no config holds another family's.
  A workdir recorded when every config held every family's keys resumes: those keys are 'version' changes."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from unimm.train import config_record  # pylint: disable=g-import-not-at-top
  own = {"transfusion": {"autoencoder", "patch_size", "diffusion_weight", "lm_loss_chunk"}, "chameleon": {"vq"},
         "janus": {"vq", "vision"}, "kl_vae": {"autoencoder", "kl_weight"}, "vq": {"vq", "vq_loss"},
         "siglip": {"vision", "siglip", "siglip_text"}}
  every_family = set().union(*own.values())
  for name, path in TINY_CONFIGS.items():
    path, _, arg = path.partition(":")
    config = load_config(path, arg or None)
    model_keys = set(config.model.keys())
    assert own[name] <= model_keys and not (every_family - own[name]) & model_keys, (name, sorted(model_keys))
    older = config.to_dict()  # the older shape: every family's keys (their defaults) in every config
    for other in families.names():
      older["model"] = {**common.base_config(other).model.to_dict(), **older["model"]}
    found = config_record.changes({"config": older}, {"config": config.to_dict()})
    assert found and set(found.values()) == {"version"}, found
    assert {key.split(".")[1] for key in found} == set(older["model"]) - model_keys
