"""What every config shares; each experiment file changes only what differs.

Every key the families share is listed here with a comment, so `--config.x.y=…`
overrides are discoverable in one place; a family's own `model.*` keys (its codec,
its loss) are listed, with comments, by its record's `config_defaults` in
unimm/families.py, and only its configs have them.
"""

import ml_collections as mlc

from unimm import families
from unimm.data import paths


def base_config(family: str = "transfusion") -> mlc.ConfigDict:
  """The keys every family shares, then `family`'s own (its record's `config_defaults`)."""
  c = mlc.ConfigDict()
  c.seed = 0

  # -- model --------------------------------------------------------------------
  m = c.model = mlc.ConfigDict()
  m.family = family  # transfusion | chameleon | janus | kl_vae, vq, siglip (train an image codec / encoder)
  m.vocab_size = 0  # 0: the tokenizer's ids rounded up to 128; > 0: declared (must hold the tokenizer's ids)
  m.backbone = mlc.ConfigDict(dict(
      num_layers=16, dim=768, num_heads=12, num_kv_heads=0, head_dim=0, mlp_hidden=0, qk_norm=False,
      rope_theta=10000.0, norm_eps=1e-5, dtype="bfloat16", remat="dots_no_batch", scan=True,
      bidirectional_images=True, attention="auto", dropout=0.0, norm_order="pre",
      mot=(),  # Mixture-of-Transformers: parts with an image-slot copy, of ("qkv", "out", "mlp", "norms")
      # What converted Hugging Face LMs need (unimm.convert): biased q/k/v (Qwen2), QK-norm as a LayerNorm
      # per head (qk_norm_kind=head_layernorm, Chameleon's), RoPE scaling none | linear | llama3 with its
      # factors (Hugging Face's definitions).
      qkv_bias=False, qk_norm_kind="rms", rope_scaling="none", rope_scaling_factor=1.0, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, rope_original_max_positions=8192))
  m.guidance = 3.0  # classifier-free guidance scale for sampling and eval (--guidance overrides; Janus: 5)
  m.z_loss = 0.0  # weight of log²Z (Chameleon uses 1e-5)
  # The family's own keys (its codec, its loss) come last, from its record: `families.get(family).config_defaults`.

  # -- data (see unimm/data/pipeline.py) -----------------------------------------
  d = c.data = mlc.ConfigDict()
  d.data_dir = paths.default_data_dir()
  d.sources = mlc.ConfigDict()
  d.mix_by = "documents"  # sources' weights are shares of documents | tokens (measured per source at start)
  # --mode=prepare trains `path` if missing; builtin_specials=False lays it out like Llama's (specials appended).
  d.tokenizer = mlc.ConfigDict(dict(path="", vocab_size=128, model_type="bpe", train_documents=20_000,
                                    builtin_specials=True))
  # A Hugging Face tokenizer.json's tokens for unimm's roles ("": tokenizer_config.json's, else unimm's
  # <boi>/<eoi>/<img> if present, else new ids after its vocabulary); unimm.data.tokenizer.HFTokenizer.
  d.tokenizer.special_tokens = mlc.ConfigDict({role: "" for role in ("pad", "bos", "eos", "boi", "eoi", "img")})
  d.image_size = mlc.FieldReference(256)
  d.image_channels = 3
  # How the sample and score commands fit a prompt's image (one the model reads) to image_size: resize
  # (squash) | crop | pad (letterboxed on (127, 127, 127): Janus). Training data is fitted by prepare
  # (--image_fit, per_role for Janus).
  d.read_image_fit = "resize"
  d.image_slots = 256  # sequence slots per image: one per latent patch or code (the family's defaults derive it)
  d.seq_len = 4096
  d.batch_size = 256  # global, split over processes
  d.shards = 0  # data shards, each packed on its own (0: one per process); fixes the global batch across process counts
  d.max_images_per_row = 8
  d.caption_first_prob = 0.8
  d.caption_dropout = 0.1
  d.caption_dropout_mode = "drop"  # drop: the unconditional example is the image alone | pad: caption → PAD (Janus)
  d.max_timestep = 1000  # diffusion families: their model.num_timesteps
  d.noise_limit_t = 500
  d.image_token_weight = 0.0  # continuous images: no token loss on image slots
  d.train_read_images = True  # False: only written images' slots are targets (Janus: read ones go through the ViT)
  d.packing_bins = 16
  d.split_long_documents = True  # a document longer than a row is split into chunks (False: skipped, counted)
  d.read_threads = 1  # 0–1 suit 2 cores; raise on real hosts
  d.read_prefetch = 16
  d.worker_count = 0  # grain worker processes; 0 = in the main process
  d.warn_skip_rate = 0.1  # warn (once per reason, with the fix) when more of the records read are skipped

  # -- parallelism ------------------------------------------------------------------
  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))  # -1: the rest of the devices
  # What "auto" settings become per target platform, resolved when the step is built for a mesh (train
  # start-up; --mode=compile for its --topology; unimm/train/setup.py resolve_targets): model.backbone.remat
  # ="auto" takes targets.<platform>.remat; train.grad_accum_steps=0 splits each device's rows into
  # microbatches of at most targets.<platform>.max_rows_per_device (0: no cap). Explicit values win.
  c.targets = mlc.ConfigDict({p: dict(remat="dots_no_batch", max_rows_per_device=0) for p in ("tpu", "gpu", "cpu")})
  c.sharding = mlc.ConfigDict()
  c.sharding.rules = "default"  # a name in unimm/parallel/sharding.py, or a list of (logical, mesh axes)

  # -- training (the paper's recipe) -----------------------------------------------
  t = c.train = mlc.ConfigDict()
  t.num_steps = 250_000
  t.learning_rate = 3e-4
  t.warmup_steps = 4000
  t.final_learning_rate = 1.5e-5  # cosine decay to this
  t.b1, t.b2, t.eps = 0.9, 0.95, 1e-8
  t.weight_decay = 0.1
  # Which params decay, by path (unimm/train/optimizer.py): (regex, multiplier of weight_decay), first match
  # wins, no match → 0. Default: kernels of dense and conv layers; not norms, biases, embeddings, codebooks.
  t.wd_mults = ((r"(.*/)?kernel", 1.0),)
  t.grad_clip = 1.0
  t.grad_accum_steps = 1  # 0: per target (c.targets)
  # Param path prefixes that train ("vision_encoder", "decoder/layer_0", ...); empty: all. Frozen params
  # get no gradient and no optimiser state (a Janus stage names its trainable parts).
  t.trainable = ()
  t.init_from = ""  # a previous stage's checkpoints dir: a fresh run starts from its params
  # > 0: a float32 EMA of the trainable weights, β = min(ema_decay, (1+n)/(10+n)) after n updates, kept in the
  # checkpoints; --mode=sample/eval and in-training samples/evals use it (--ema=false: the raw weights).
  t.ema_decay = 0.0
  t.skip_nonfinite = False  # True: skip an update whose loss/grads are not finite; False: stop the run
  t.max_consecutive_skips = 10  # with skip_nonfinite: more skips in a row than this end the run as diverged
  # Last known good checkpoint (unimm/train/health.py): one after which good_after_steps steps ran finite and
  # without a loss above loss_spike_factor × the running median; spared by the keep_checkpoints rotation.
  t.good_after_steps = 100
  t.loss_spike_factor = 3.0
  t.rewind_to_last_good = False  # after a divergence: resume from the last known good checkpoint
  # Resuming with another config (unimm/train/config_record.py): safe keys are taken and recorded; these
  # allow the rest. Data changes need the iterator reset; structural ones (model, optimiser) the override.
  t.reset_data_iterator = False
  t.allow_config_change = False
  t.restart_from_scratch = False  # start at step 0 when checkpoints exist but none restores (kept aside)
  t.log_every = 50
  t.checkpoint_every = 1000
  t.keep_checkpoints = 3
  t.async_checkpoints = True
  t.sample_every = 5000  # sample grid PNG + TensorBoard; 0 = never
  t.sample_prompts = 8
  t.sample_steps = 50
  t.sample_guidance = 3.0
  t.eval_every = 0  # run a small --mode=eval every N steps (metrics under eval/ in TensorBoard); 0 = never
  t.eval_examples = 32
  t.eval_diffusion_steps = 25
  t.final_eval_examples = 0  # after training, evaluate on this many test examples and print it (0: don't)
  t.final_eval_diffusion_steps = 50

  families.get(family).config_defaults(c)
  return c


def embedded_data(c: mlc.ConfigDict, dataset: str) -> None:
  """Points the config at an embedded dataset (shapes 32×32 RGB, digits 8×8 gray)."""
  d = c.data
  d.sources = mlc.ConfigDict({dataset: {"kind": "tfds", "tfds_name": dataset, "builder_config": "", "weight": 1.0}})
  d.tokenizer.path = "{data_dir}/tokenizers/" + dataset + "_bpe128.model"
  d.tokenizer.vocab_size = 128
  d.image_size = 32 if dataset == "shapes" else 8
  d.image_channels = 3 if dataset == "shapes" else 1


def tiny_recipe(c: mlc.ConfigDict, dataset: str) -> None:
  """The unified families' tiny size and recipe on an embedded dataset, one for all three so they compare
  at equal size (bench/compare_families.py): a 4 × 128 backbone in float32 without remat or scan (what is
  fastest on a 2-core CPU, ~0.65 s a step), 16 rows a batch, 1200 steps at 3e-3 with a cosine to 1e-4,
  evaluated on 100 test examples at the end. A family's config then sets what is its own."""
  c.model.backbone.update(num_layers=4, dim=128, num_heads=4, mlp_hidden=384, remat="none", scan=False,
                          dtype="float32", attention="xla")
  d = c.data
  d.seq_len = 256 if dataset == "shapes" else 128
  d.batch_size = 16
  d.max_images_per_row = 4 if dataset == "shapes" else 6
  c.train.update(num_steps=1200, learning_rate=3e-3, warmup_steps=100, final_learning_rate=1e-4, weight_decay=0.0,
                 log_every=25, checkpoint_every=400, sample_every=400, final_eval_examples=100)


def smoke_data(c: mlc.ConfigDict, views: dict) -> None:
  """A paper recipe's sources as views of the embedded shapes data (32×32 RGB), one per source name the
  recipe mixes, with the view's keys (`weight`, `text_only`, `caption_first_prob`), and rows sized for it."""
  c.data.sources = mlc.ConfigDict({name: {"kind": "tfds", "tfds_name": "shapes", "builder_config": "", **view}
                                   for name, view in views.items()})
  c.data.image_size = 32
  c.data.image_channels = 3
  c.data.seq_len = 256
  c.data.batch_size = 4
  c.data.max_images_per_row = 3


def smoke_training(c: mlc.ConfigDict, learning_rate: float, steps: int = 24) -> None:
  """A paper recipe's schedule at `steps` steps: the same shape (warm-up, then cosine to the same fraction
  of the peak, or constant), checkpoints every 10 steps, no in-training samples or evaluation."""
  t = c.train
  fraction = float(t.final_learning_rate) / float(t.learning_rate)
  t.warmup_steps = max(1, steps // 6) if int(t.warmup_steps) else 0
  t.num_steps, t.learning_rate, t.final_learning_rate = steps, learning_rate, learning_rate * fraction
  t.update(log_every=1, checkpoint_every=10, sample_every=0, eval_every=0, final_eval_examples=0)


def paper_size(c: mlc.ConfigDict, layers: int, dim: int, heads: int) -> mlc.ConfigDict:
  """A Table 2 size: Llama-2 tokenizer (32k), 4096 tokens, latent 32×32×8 (256 px, VAE /8), patch 2."""
  c.model.backbone.update(num_layers=layers, dim=dim, num_heads=heads)
  c.model.vocab_size = 32_000
  c.model.autoencoder.update(kind="kl_vae", downsample=8, latent_channels=8, channel_mults=(1, 2, 4, 4))
  c.model.patch_size = 2
  c.data.image_size = 256
  paper_mesh(c)
  return c


def paper_mesh(c: mlc.ConfigDict) -> None:
  """FSDP over every device (ZeRO-3: params, gradients and Adam state split N ways, each layer gathered in
  the scan), what fits the paper sizes on a v5p-256 slice and 64 H100s (docs/scaling.md)."""
  c.mesh.update(data=1, fsdp=-1)
