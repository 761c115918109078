"""Shared fixtures: the embedded datasets (small configs) and a tokenizer, built once per session."""

import os
import tempfile

import pytest

# Tests run on the CPU; with libtpu installed (the test extras bring it for --mode=compile), JAX would
# otherwise try to start a TPU backend in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this test run (both xdist workers and every subprocess they
# start): the CLI tests launch the same programs many times (resume after a kill, relaunches of several
# processes), and a tiny model's step compiles in seconds but loads from the cache in milliseconds.
# The process that makes it (pytest's controller; workers inherit it) removes it at the end of the run.
_OWN_COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "unimm-test-jax-cache-" + os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))))
# The suite's models are tiny: XLA's CPU backend spends far more time optimising their programs than running
# them (a Janus step: 11 s to compile at the default level, 6 s at 0), so the tests (and every process they
# start) compile without LLVM's optimisations. Numbers move by rounding only; each test compares programs
# built the same way, or against references with tolerances. Users' runs keep XLA's default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_sessionfinish(session):
  """Removes this run's compilation cache (hundreds of MB) unless the caller named one."""
  if _OWN_COMPILATION_CACHE and not hasattr(session.config, "workerinput"):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def load_config(path: str, arg: str | None = None):
  """A config file's `get_config(arg)`, loaded the way the CLI loads it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def random_params(model, *inputs, seed: int = 0, std: float = 0.1, **kwargs):
  """`model`'s params for `inputs` drawn at random from their shapes (norm scales 1), without compiling its
  init (tens of seconds for a whole family's model on a busy CPU): for tests that need any weights."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **kwargs))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.ones(s.shape, s.dtype) if getattr(path[-1], "key", None) == "scale"
      else jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype), shapes)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A data dir with shapes/small and digits prepared and both tokenizers trained."""
  from unimm import main  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("data"))
  for dataset in ("shapes", "digits"):
    main.prepare(small_config(path, dataset))
  return path


def small_config(data_dir: str, dataset: str = "shapes"):
  """The tiny config on a test data dir, shapes on its small builder config."""
  config = load_config("configs/transfusion/tiny.py", dataset)
  config.data.data_dir = data_dir
  if dataset == "shapes":
    config.data.sources.shapes.builder_config = "small"
  return config


@pytest.fixture
def shapes_config(data_dir):
  return small_config(data_dir, "shapes")


@pytest.fixture(scope="session")
def shapes_tokenizer(data_dir):
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.load_tokenizer(small_config(data_dir, "shapes").data)


def optimized_xla_env(level: int | None = None) -> dict:
  """This process's environment with XLA's default optimisation level (or `level`): for a subprocess whose
  time is its steps, not its compiles. Level 1 suits a few dozen steps: a smoke recipe's 24 steps took
  32.5 s cold and 17.5 s from the compilation cache at level 1; 38.5 s and 30 s at level 0; 38.8 s and
  15.6 s at the default."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_backend_optimization_level")]
  if level is not None:
    flags.append(f"--xla_backend_optimization_level={level}")
  return {**os.environ, "XLA_FLAGS": " ".join(flags)}


def embedded_spec(name: str, builder_config: str = ""):
  return {"kind": "tfds", "tfds_name": name, "builder_config": builder_config, "weight": 1.0}




# What a consumer of the `shapes_vae` fixture's VAE adds to configs/transfusion/tiny.py:shapes_vae (the
# fixture trains a narrower VAE than configs/vae/shapes.py, to train in seconds).
SHAPES_VAE_OVERRIDES = ("--config.model.autoencoder.channels=8",)
SHAPES_VAE_STEPS = 30


@pytest.fixture(scope="session")
def shapes_vae(data_dir, tmp_path_factory):
  """A tiny shapes KL-VAE (configs/vae/shapes.py, 8 channels, batch 4) trained through the CLI for 30 steps:
  its workdir. Its checkpoints dir holds the latent statistics the run measured at its end
  (latent_stats.json); consumers set --config.model.autoencoder.checkpoint=WORKDIR/checkpoints plus
  SHAPES_VAE_OVERRIDES, and must not change that dir (copy it first). Tests using it carry
  `xdist_group("shapes_vae")` so it trains once."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("vae_shapes"))
  out = subprocess.run([sys.executable, "-m", "unimm.main", "--config=configs/vae/shapes.py", f"--workdir={workdir}",
                        f"--config.data.data_dir={data_dir}", "--config.data.sources.shapes.builder_config=small",
                        *SHAPES_VAE_OVERRIDES, "--config.data.batch_size=4", "--config.train.warmup_steps=2",
                        f"--config.train.num_steps={SHAPES_VAE_STEPS}", "--config.train.log_every=10"],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


@pytest.fixture(scope="session")
def shapes_vq(data_dir, tmp_path_factory):
  """A tiny shapes VQ tokenizer (8×8 codes) trained through the CLI for 300 steps of batch 4, ending with its
  evaluation on 100 test images (eval.json): its workdir. Session fixtures are per xdist worker: tests
  using it carry `xdist_group("shapes_vq")` (the suite runs with --dist loadgroup) so it trains once."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("vq_shapes"))
  out = subprocess.run([sys.executable, "-m", "unimm.main", "--config=configs/tokenizers/tiny.py:shapes",
                        f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
                        "--config.data.sources.shapes.builder_config=small", "--config.train.num_steps=300",
                        "--config.data.batch_size=4", "--config.model.vq_loss.reinit_dead_codes_until=200",
                        "--config.train.final_eval_examples=100"], cwd=REPO, capture_output=True, text=True,
                       timeout=900, env=optimized_xla_env())
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir
