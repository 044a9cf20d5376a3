"""Every configuration field, documented once. Other configs start from this one and override.

The defaults are the paper's CIFAR-10 ADM baseline (uniform timesteps), reading the built-in
digits data so that the file runs anywhere; `cifar10_adm.py` and `cifar10_adm_bs.py` point it
at CIFAR-10.

    ddpm-bs --config=configs/default.py --workdir=runs/default
"""

import copy

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = (
        0  # Root seed: init, data order, timesteps, noise, dropout and sampling derive from it.
    )

    # --- Data -------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # 'digits' (built in), 'folder' (images), or a tfds name ('cifar10', …).
    c.data.data_dir = config_dict.placeholder(str)  # tfds data_dir with the prepared dataset.
    c.data.folder = config_dict.placeholder(str)  # Image folder for name='folder' (PNG/JPEG).
    c.data.split = "train"  # tfds split.
    c.data.image_size = 32  # Side of the square training images, pixels.
    c.data.channels = 3  # Image channels (digits are grayscale and repeated to 3 when 3).
    c.data.random_flip = True  # Random horizontal flips (decided by seed, epoch and index).
    c.data.class_conditional = False  # Feed labels to the model (needs model.num_classes).
    # An image folder's unreadable file: 'skip' (logged with its path, counted in the metric
    # data_skipped_examples, replaced by the next readable image) or 'halt' (stop the run).
    c.data.on_corrupt = "skip"
    c.data.crop_size = 0  # Centered square crop of the raw image first, pixels; 0 = largest.
    c.data.prefetch = 2  # Batches prepared ahead of the training step.
    # grain worker processes preparing batches (JPEG decoding): −1 = automatic (min(8, CPUs)
    # for folders and tfds, none for digits), 0 = in the training process.
    c.data.num_workers = -1
    c.data.num_threads = 0  # Threads decoding one batch's images per process; 0 = automatic.

    # --- Model: the ADM U-Net (guided-diffusion's UNetModel) --------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.model_channels = 128  # Base channel count.
    c.model.channel_mult = (1, 2, 2, 2)  # Channel multiplier per resolution level.
    c.model.num_res_blocks = 3  # Residual blocks per level.
    c.model.attention_resolutions = (16, 8)  # Resolutions (pixels) with self-attention.
    c.model.num_heads = 4  # Attention heads (ignored when num_head_channels > 0).
    c.model.num_head_channels = -1  # Channels per head; −1 to use num_heads.
    c.model.dropout = 0.3  # Dropout rate in the residual blocks.
    c.model.use_scale_shift_norm = True  # AdaGN: the timestep embedding scales and shifts.
    c.model.resblock_updown = True  # Residual blocks for down/upsampling.
    # Attention's qkv split: guided-diffusion's QKVAttention (True) or QKVAttentionLegacy
    # (False, its default); set it to load a checkpoint trained with the new order.
    c.model.use_new_attention_order = False
    c.model.learn_sigma = True  # Output 2C channels and train variances with the hybrid loss.
    c.model.num_classes = 0  # Classes for class-conditional models; 0 for unconditional.
    c.model.dtype = "float32"  # Compute dtype: 'float32' or 'bfloat16' (params stay float32).
    # jax.nn.dot_product_attention backend: None (XLA everywhere) or 'cudnn' (GPU, bf16).
    c.model.attention_implementation = config_dict.placeholder(str)

    # --- Diffusion --------------------------------------------------------------------------
    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"  # 'linear' or 'cosine'.
    c.diffusion.num_timesteps = 1000  # T.

    # --- Timestep sampler (ddpm_bs.timesteps) -----------------------------------------------
    c.timesteps = ml_collections.ConfigDict()
    c.timesteps.sampler = "uniform"  # 'uniform', 'bernoulli', 'piecewise', 'beta', 'lognormal',
    #                                  'logit_normal', 'loss_aware', 'ot_gap' or 'ot_rate'.
    # bernoulli: end of the significant interval, 1-based, in [1, T]; or 'auto' to locate it
    # with optimal transport before training (mode=locate; reuses the workdir's interval.json).
    c.timesteps.t_delta = config_dict.FieldReference(800, field_type=object)
    # bernoulli: probability of the significant interval {1..t_δ}, in [0, 1]; it favours that
    # interval only when p > t_δ/T (p = t_δ/T is the uniform law). 'auto': p = Σ_{t<t_δ} W(t) /
    # Σ_t W(t), the share of the fitted W₂ curve W(t) = e^{−K s(t)} on the interval (K from
    # decay_rate), which is always > t_δ/T. Pair t_delta='auto' with p='auto'.
    c.timesteps.p = config_dict.FieldReference(0.8, field_type=object)
    c.timesteps.boundaries = (800,)  # piecewise: interior 1-based boundaries.
    c.timesteps.masses = (0.8, 0.2)  # piecewise: mass of each interval.
    c.timesteps.beta_a = 1.0  # beta: shape a.
    c.timesteps.beta_b = 1.0  # beta: shape b.
    c.timesteps.p_mean = -1.2  # lognormal: mean of ln σ (EDM).
    c.timesteps.p_std = 1.2  # lognormal: std of ln σ (EDM).
    c.timesteps.logit_mean = 0.0  # logit_normal: mean of logit(t/T) (SD3).
    c.timesteps.logit_std = 1.0  # logit_normal: std of logit(t/T) (SD3).
    c.timesteps.history = 10  # loss_aware: losses remembered per timestep.
    c.timesteps.uniform_prob = 0.001  # loss_aware: mass kept uniform.
    # ot_gap, ot_rate and p='auto': K of the fitted W₂ decay W(t)/W(0) = e^{−K s(t)}, s(t) =
    # −log ᾱ_t (per unit of s; ½ for a translation); 'auto' reads interval.json (mode=locate,
    # run first when absent), or a number > 0 (e.g. 0.61, digits 0 vs 1 in experiments/REPORT.md).
    c.timesteps.decay_rate = config_dict.FieldReference("auto", field_type=object)
    c.timesteps.ot_floor = 0.1  # ot_gap, ot_rate: fraction of mass spread uniformly, in [0, 1].
    c.timesteps.importance_weighting = False  # Reweight by 1/(T·p(t)) for an unbiased objective.

    # --- Loss (ddpm_bs.losses) --------------------------------------------------------------
    c.loss = ml_collections.ConfigDict()
    c.loss.target = "eps"  # Model parameterisation: 'eps', 'x0' or 'v'.
    c.loss.weighting = "none"  # 'none', 'p2', 'min_snr' or 'debias'.
    c.loss.p2_k = 1.0  # P2's k.
    c.loss.p2_gamma = 1.0  # P2's γ.
    c.loss.min_snr_gamma = 5.0  # Min-SNR's γ.
    c.loss.max_weight = config_dict.placeholder(float)  # Optional cap on per-example weights.

    # --- Optimiser (optax AdamW) ------------------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4  # Peak learning rate (ADM: 1e-4 on CIFAR-10 at batch 128).
    c.optim.warmup_steps = 0  # Linear warm-up steps from 0 to lr.
    c.optim.weight_decay = 0.0  # Decoupled weight decay.
    c.optim.b1 = 0.9  # Adam β1.
    c.optim.b2 = 0.999  # Adam β2.
    c.optim.eps = 1e-8  # Adam ε.
    c.optim.grad_clip = 1.0  # Global-norm gradient clipping; 0 disables.

    # --- Training loop ----------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # Global batch size, over all devices and processes.
    c.train.grad_accum_steps = 1  # Micro-batches per step (the batch is split, gradients summed).
    c.train.num_steps = 500_000  # Training steps.
    c.train.ema_rates = (0.9999,)  # EMA decay rates; the first one is used for samples.
    # Periodic work (metric writes, checkpoints, sample grids, evaluations) happens every N
    # steps and at the last step; N = 0 turns it off (train.itstime). A stop by SIGTERM still
    # writes a checkpoint.
    c.train.log_every = 100  # Steps between metric writes.
    c.train.checkpoint_every = 10_000  # Steps between checkpoints.
    c.train.keep_checkpoints = 3  # Checkpoints kept in the workdir.
    # Steps between checkpoints kept for good beside the newest keep_checkpoints (0: none), for
    # FID-vs-iterations curves; use a multiple of checkpoint_every.
    c.train.keep_period = 0
    c.train.sample_every = 10_000  # Steps between sample grids.
    c.train.num_samples = 64  # Images in each sample grid.
    # Model evaluations of the grids and evaluations, drawn with sample.method and its options
    # (the same sharded path as mode=sample).
    c.train.sample_steps = 100
    # Steps between evaluations: train.eval_samples samples from the first EMA, scored with
    # sample.metric (and its weights/reference files), written as eval/<metric> beside the
    # training metrics.
    c.train.eval_every = 0
    c.train.eval_samples = 1797  # Samples per evaluation (the paper's FID protocol: 50,000).
    # A step whose loss or gradient is not finite is never applied. 'skip': count it (metric
    # skipped_steps) and go on; 'halt': stop with a message naming the step, keeping the
    # checkpoints written before it.
    c.train.on_nonfinite = "skip"
    # A Weights & Biases project to log the run to as well (None: off; needs `pip install
    # wandb`; the W&B team comes from the WANDB_ENTITY environment variable, else your default).
    c.train.wandb_project = config_dict.placeholder(str)

    # --- Locating t_δ with optimal transport (mode=locate; ddpm_bs.interval) ---------------
    c.interval = ml_collections.ConfigDict()
    c.interval.set_a = "class:0"  # First image set: 'class:<k>' (class k of config.data) or 'all'.
    c.interval.set_b = "class:1"  # Second: 'class:<k>', 'all', or 'perturbed' (set A + noise).
    c.interval.num_images = 500  # Images per set, at most (a smaller class uses all it has).
    c.interval.num_t = 50  # Grid timesteps spread over [0, T−1], both ends included.
    c.interval.num_seeds = 3  # Independent noise draws the curve is averaged over.
    c.interval.delta = 0.1  # Proposition 2's δ on W₂(t)/W₂(0) (δ² = 1% of W₂²).
    c.interval.epsilon_rel = 0.02  # Sinkhorn ε as a fraction of the mean squared distance at t.
    c.interval.batch_size = config_dict.placeholder(int)  # None: dense costs; else online rows.
    # 'debiased_baseline' (decays), 'naive' (Eq. 8 as written; rises), 'sinkhorn_divergence'.
    c.interval.estimator = "debiased_baseline"
    c.interval.max_iterations = 1000  # Sinkhorn iterations per problem.
    c.interval.threshold = 1e-3  # Sinkhorn tolerance: L1 error of the marginals.
    c.interval.perturb_std = 0.2  # set_b='perturbed': pixel-noise std (images in [−1, 1]).

    # --- Sampling (mode=sample) -------------------------------------------------------------
    c.sample = ml_collections.ConfigDict()
    c.sample.method = (
        "ddim"  # 'ddpm', 'ddim', 'dpm_solver', 'dpm_solver++', 'edm_euler', 'edm_heun'.
    )
    c.sample.steps = 100  # Model evaluations (respaced steps for ddpm/ddim).
    c.sample.num_samples = 64  # Images to draw (the paper's FID uses 50,000).
    c.sample.batch_size = 256  # Images per compiled call, split over the devices.
    c.sample.eta = 0.0  # DDIM's η.
    # Clip x̂0 to [−1, 1] at every step (guided-diffusion's default). Needed by the ODE solvers on
    # the cosine schedule, whose first step starts at σ ≈ 2·10⁴ and amplifies ε̂ errors by ~10³.
    c.sample.clip_denoised = True
    # DPM-Solver step spacing: 'logSNR' or 'time_uniform'. Time-uniform steps span huge λ jumps
    # near t = T on the cosine schedule; singlestep orders 2-3 then saturate digits samples.
    c.sample.skip_type = "logSNR"
    # mode=eval: metrics, comma-separated: 'digits_fid' (built-in data), 'fid', 'sfid', 'is'.
    c.sample.metric = "digits_fid"
    # Converted FID Inception .npz (python -m ddpm_bs.inception --convert); for fid, sfid, is.
    c.sample.inception_weights = config_dict.placeholder(str)
    # fid/sfid reference: a stats .npz (python -m ddpm_bs.evaluation --reference_stats) or a
    # guided-diffusion reference batch (VIRTUAL_*.npz).
    c.sample.reference_stats = config_dict.placeholder(str)
    c.sample.eps_scale_k = 0.0  # Epsilon Scaling: ε̂ / (k·i + b) for ddpm/ddim; (0, 1) is off.
    c.sample.eps_scale_b = 1.0

    # --- Device mesh ------------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # Devices on the data axis; −1 for all that mesh.fsdp leaves.
    # Devices on the fsdp axis: params, EMA and optimizer state are split over it (ZeRO-3),
    # the batch over data × fsdp. 1 = pure data parallelism; −1 = all that mesh.data leaves.
    c.mesh.fsdp = 1

    return c


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks any config to something a CPU runs in seconds (for tests and dry runs)."""
    config = copy.deepcopy(config)  # keeps timesteps.t_delta's int-or-'auto' reference
    config.data.image_size = 8
    config.model.model_channels = 32
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (4,)
    config.model.num_heads = 1
    config.model.num_head_channels = -1
    config.model.dropout = 0.0
    config.train.batch_size = 8
    config.train.num_steps = 4
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.train.sample_every = 0
    config.train.num_samples = 4
    config.train.sample_steps = 4
    return config
