"""Tiny Transfusion on `shapes` (the README demo) or `digits`; trains on 2 CPU cores.

    python -m unimm.main --config=configs/transfusion/tiny.py --workdir=/tmp/unimm_tiny
    python -m unimm.main --config=configs/transfusion/tiny.py:digits --workdir=/tmp/unimm_digits

`:shapes_vae` diffuses in the latent space of a KL-VAE trained with
configs/vae/shapes.py (pass --config.model.autoencoder.checkpoint=VAE_WORKDIR/checkpoints).

Modality-specific weights on shapes: `:mot` (Mixture-of-Transformers: every backbone part has an
image-slot copy, all trained); `:text_lm` (the same model trained on the captions alone: a tiny LM);
`:lmfusion` (LMFusion: the text weights frozen, from a text LM, the image copies initialised from them and
trained with the patch and timestep layers):

    python -m unimm.main --config=configs/transfusion/tiny.py:text_lm --workdir=/tmp/tiny_lm
    python -m unimm.main --config=configs/transfusion/tiny.py:lmfusion --workdir=/tmp/lmfusion \
        --config.train.init_from=/tmp/tiny_lm/checkpoints

Sweeps (`get_sweep`; launch/sweep.py --config=configs/transfusion/tiny.py --sweep=NAME):
`objective` (DDPM ε, DDPM v, flow uniform, flow logit-normal), `prediction` (DDPM ε vs v), `flow_head`
(velocity vs x̂₀), `shift` (written/read time shifts), `weights` (shared vs Mixture-of-Transformers), `ema`
(off vs 0.999), `lr` (1e-3, 3e-3, 1e-2), `patches` (4×4 vs 8×8 pixel patches, with and without 2D positions).
"""

from configs import common

VARIANTS = ("shapes", "digits", "shapes_vae", "mot", "text_lm", "lmfusion")
MOT_ALL = ("qkv", "out", "mlp", "norms")


def get_config(arg=None):
  variant = arg or "shapes"
  if variant not in VARIANTS:
    raise ValueError(f"tiny.py takes one of {[':' + v for v in VARIANTS]}, got {arg!r}")
  dataset = "digits" if variant == "digits" else "shapes"
  c = common.base_config()
  common.tiny_recipe(c, dataset)
  if dataset == "digits":
    c.model.patch_size = 2
  elif variant == "shapes_vae":  # 32×32×3 → 16×16×8 latents, 2×2 patches: 64 slots
    c.model.autoencoder.update(kind="kl_vae", downsample=2, latent_channels=8, channels=32, channel_mults=(1, 2))
    c.model.patch_size = 2
  else:
    # 8×8 pixel patches (16 slots an image) with 2D sin-cos positions: with 4×4 patches each patch drew its own
    # part of an edge, a pixel in or out of its neighbours', and squares read as circles (the README's table;
    # at 8×8 the positions change nothing measured, at 4×4 they lifted captioning 0.85 → 0.90)
    c.model.patch_size = 8
    c.model.patch_position = "sincos"
    c.data.max_images_per_row = 8  # 16-slot images: about 7 captioned images fill a 256-token row

  # What the demo's measurements chose (the README's ablation table, `get_sweep`): flow matching with
  # logit-normal times (DDPM ε gave speckle at the top timesteps, v fixed that; flow with logit-normal
  # times then lifted captioning), the written images' times shifted by 3 towards noise (shapes are decided
  # there) but not the read ones' (captioning reads clean images), an x̂₀ head (captioning 0.79 → 0.87 at
  # that shift), a learning rate of 3e-3, then 8×8 patches with 2D positions (above: text→image 0.53 → 0.93).
  # An EMA (0.999) did not help at 1200 steps.
  c.model.objective = "flow"
  c.model.prediction = "x0"
  c.model.flow.update(time_sampling="logit_normal", shift=3.0, read_shift=1.0)

  common.embedded_data(c, dataset)
  if variant in ("mot", "lmfusion"):
    c.model.backbone.mot = MOT_ALL
  if variant == "lmfusion":  # the LM's weights (embeddings, text copies, head) stay as the text LM left them
    c.train.trainable = ("patch", "time", "decoder/*_image/*")
  if variant == "text_lm":
    c.data.sources.shapes.text_only = True
    c.train.update(sample_every=0, final_eval_examples=0)
  c.data.caption_first_prob = 0.7  # more image-first pairs than the paper's 0.2: captioning learns faster
  c.train.final_eval_diffusion_steps = 50  # the demo ends by evaluating (about a minute) and printing the metrics
  return c


def get_sweep(name=None):
  """The ablations around the demo's choices: a list of override sets (keys as in --config.KEY)."""
  plain_flow = {"model.objective": "flow", "model.prediction": "epsilon", "model.flow.shift": 1.0,
                "model.flow.read_shift": 0.0}
  if name == "objective":  # DDPM ε (the paper), DDPM v, flow (a velocity head, unshifted) uniform / logit-normal
    return [{"model.objective": "ddpm", "model.prediction": p} for p in ("epsilon", "v")] + [
        {**plain_flow, "model.flow.time_sampling": s} for s in ("uniform", "logit_normal")]
  if name == "prediction":  # DDPM's two parameterisations
    return [{"model.objective": "ddpm", "model.prediction": p} for p in ("epsilon", "v")]
  if name == "flow_head":  # what the flow head outputs, at the demo's shift: the velocity or x̂₀
    return [{"model.prediction": p} for p in ("epsilon", "x0")]
  if name == "shift":  # (written, read) time shifts, with the demo's x̂₀ head
    return [{"model.flow.shift": w, "model.flow.read_shift": r} for w, r in ((1.0, 1.0), (3.0, 3.0), (3.0, 1.0),
                                                                              (5.0, 1.0))]
  if name == "weights":  # shared weights vs Mixture-of-Transformers (the same model FLOPs a token)
    return [{"model.backbone.mot": ()}, {"model.backbone.mot": MOT_ALL}]
  if name == "ema":
    return [{"train.ema_decay": d} for d in (0.0, 0.999)]
  if name == "patches":  # (patch side, 2D positions): 4×4 patches take 64 slots an image, 4 a row; 8×8 16, 8 a row
    return [{"model.patch_size": k, "model.patch_position": p, "data.max_images_per_row": 4 if k == 4 else 8}
            for k, p in ((4, "none"), (4, "sincos"), (8, "none"), (8, "sincos"))]
  if name == "lr":
    return [{"train.learning_rate": lr} for lr in (1e-3, 3e-3, 1e-2)]
  raise ValueError(f"tiny.py's sweeps: --sweep=objective, prediction, flow_head, shift, weights, ema, lr or patches, got {name!r}")
