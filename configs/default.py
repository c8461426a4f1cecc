"""Defaults that every experiment config starts from; not an experiment by itself.

    resnet-jax train --config configs/default.py --workdir runs/default

trains ResNet-20 on Fashion-MNIST for 2,000 steps; the tuned recipe is configs/fashion_mnist_resnet20.py.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Model: any name of `resnet-jax models` (or a CIFAR depth), with ResNet attribute overrides.
    config.model = "resnet20"
    # drop_path_rate: stochastic depth (Huang et al. 2016), each residual branch dropped per example in training,
    # linearly more often with depth up to this rate in the last block (e.g. 0.1; 0: none; residual nets only).
    config.model_overrides = ml_collections.ConfigDict({"zero_init_residual": False, "drop_path_rate": 0.0})
    config.dtype = "float32"  # "bfloat16"/"float16": half compute, fp32 parameters and BN statistics
    # (float16 adds dynamic loss scaling)

    # Data: fashion_mnist, mnist, cifar10, cifar100, imagenet2012, synthetic.
    config.dataset = "fashion_mnist"
    config.data_dir = ml_collections.config_dict.placeholder(str)  # None: the dataset's default place
    # A missing data set is downloaded into data_dir (or its default place): MNIST and Fashion-MNIST as IDX files
    # checked against pinned SHA-256 sums, CIFAR through tfds. False: fail with what to fetch, and from where.
    config.download = True
    config.train_split = "train"  # e.g. "train[:45000]" for He et al.'s 45k/5k CIFAR split
    config.eval_split = "test"
    config.augment = True
    config.crop_padding = 4  # He et al. CIFAR: pad 4 and random-crop back; 0 turns cropping off
    config.random_flip = True
    config.random_erasing = 0.0  # Zhong et al.: erase a random box (noise-filled) of this fraction of images
    config.mixup_alpha = 0.0
    config.label_smoothing = 0.0
    config.image_size = ml_collections.config_dict.placeholder(int)  # resize images to N x N (None: as stored)
    # How the model takes its images: (pixels / 255 - input_mean) / input_std per channel. Empty: the data set's
    # statistics. Converted weights record their source's here (Keras' ResNets were trained with other ones).
    config.input_mean = ()
    config.input_std = ()
    # True: the training set (an in-memory one) copied to every device once and each batch cropped, flipped and
    # normalised there, the same batches as the host's, for jit without erasing, mixup or image_size. On a GPU the
    # host cannot keep up with a CIFAR-sized step. steps_per_call > 1: that many steps per compiled call
    # (lax.scan), which saves launching each step from Python (README, "Speed").
    config.data_on_device = False
    config.steps_per_call = 1

    # Optimisation: SGD with coupled L2 weight decay, as in the papers.
    config.batch_size = 128  # global, over every device and process
    config.eval_batch_size = 500
    config.num_train_steps = 2_000
    config.optimizer = "sgd"
    config.learning_rate = 0.1
    config.scale_learning_rate_by_batch = False  # lr = learning_rate * batch_size / 256
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 1e-4
    config.weight_decay_exclude_bn_and_bias = False
    config.grad_clip_norm = 0.0  # 0: no clipping
    config.lr_schedule = "cosine"  # "constant", "step" or "cosine"
    config.lr_boundaries_steps = ()  # "step": divide by 1 / lr_decay_factor at these steps ...
    config.lr_boundaries_epochs = ()  # ... and at these epochs
    config.lr_decay_factor = 0.1
    config.warmup_steps = 0
    config.warmup_start_learning_rate = 0.0

    # Transfer learning (resnet_jax/train/transfer.py); the defaults train from scratch.
    config.init_from = ml_collections.config_dict.placeholder(str)  # start from the latest weights of this
    # `resnet-jax convert` output or training workdir (same model; the head is replaced for a new class count)
    config.reinit_head = False  # also replace a head whose class count fits
    config.freeze_backbone = False  # train the head only
    config.stage_lr_multipliers = ()  # or one learning-rate multiplier for the stem and each stage; 0 freezes
    config.bn_update = True  # False: BN layers normalise with their running statistics and keep them as they are

    # Pruning (resnet_jax/compress/prune.py, docs/compression.md): global magnitude pruning of the conv kernels to
    # `sparsity` (the fraction at zero) on Zhu & Gupta's cubic schedule from begin_step to end_step (-1: three
    # quarters of num_train_steps, leaving the rest to recover), the masks recomputed every `frequency` steps.
    config.prune = ml_collections.ConfigDict({"sparsity": 0.0, "begin_step": 0, "end_step": -1, "frequency": 50})

    # Knowledge distillation (resnet_jax/compress/distill.py): the loss mixes in the soft targets of the run in
    # `teacher` (a workdir of the same data set; None: off), weighted by alpha, at this temperature.
    config.distill = ml_collections.ConfigDict(
        {"teacher": ml_collections.config_dict.placeholder(str), "temperature": 4.0, "alpha": 0.9}
    )

    # Scale: "jit" (one program over a mesh of every device), "pmap" (one program per device,
    # per-device BN statistics) or, on one CPU, "batch_parts" (the batch in `batch_parts` parts whose programs
    # run side by side on host threads, BN statistics per part; the fastest one-process CPU step); joining a
    # multi-process job (README: "Many hosts").
    config.parallelism = "jit"
    config.batch_parts = 2
    config.distributed = ml_collections.ConfigDict(
        {
            "coordinator_address": ml_collections.config_dict.placeholder(str),  # "host:port" of process 0
            "num_processes": ml_collections.config_dict.placeholder(int),
            "process_id": ml_collections.config_dict.placeholder(int),
            "auto_detect": False,  # TPU pods, SLURM, ...: let JAX find the above
            "cpu_collectives": False,  # CPU-only processes: collectives through gloo
        }
    )

    # Bookkeeping.
    config.seed = 0
    # JAX's persistent compilation cache (e.g. "~/.cache/resnet-jax/xla", or a bucket on a pod): a resumed or
    # repeated run loads its compiled steps instead of compiling them again. "" = off.
    config.compilation_cache_dir = ""
    config.log_every_steps = 50
    config.eval_every_steps = 500
    # > 0: stop at the first evaluation with at least this test accuracy (time to accuracy: metrics.jsonl
    # gives every record's elapsed_s; evaluate often, evaluations count in the time).
    config.stop_at_test_accuracy = 0.0
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 3  # the latest k, plus the best by test accuracy
    # When every checkpoint of the workdir is damaged: False stops with what to do, True starts over at step 0.
    config.start_over_if_corrupt = False
    return config
