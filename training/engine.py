"""The one training loop every method shares.

Single process or ``torchrun`` (DDP, gloo on CPU / nccl on CUDA), bf16 autocast on CPUs
that have it and AMP on CUDA (``run.precision``, training/precision.py), warm-up + multistep/cosine schedules, tqdm progress, JSON-lines metrics, periodic
evaluation, and atomic per-epoch checkpoints: ``--resume`` continues from the last
one with model, optimiser, scheduler, scaler and RNG states, so a run killed with
SIGKILL and resumed ends with the same weights as an uninterrupted run (CPU).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ltzoo.zoo import Ensemble
from ltzoo.zoo.files import CONFIG_NAME, atomic_write, write_json
from ltzoo.zoo.registry import get_entry

from .config import RunConfig, check_same_run
from .data.batched import BatchAugment, UInt8Batches, batched_augment_for, collate_uint8
from .distributed import DistInfo, all_ranks_finite, barrier, cleanup, init_distributed
from .methods import METHODS, Method, StageRun
from .precision import Precision, resolve_precision

CHECKPOINT = "checkpoint.pt"
#: a run stops after this many non-finite losses in a row (each one's step is skipped)
MAX_NONFINITE_STEPS = 20
logger = logging.getLogger("ltzoo.training")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str, dist_info: DistInfo | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device='cuda' but no CUDA device is available")
        return torch.device("cuda", dist_info.local_rank if dist_info else 0)
    return torch.device(name)


def lr_lambda(cfg: RunConfig, steps_per_epoch: int):
    """Per-step multiplier: linear warm-up, then multistep decay or cosine.

    The warm-up lasts a whole number of steps (a fractional ``warmup_epochs * steps_per_epoch``
    is rounded up): its multiplier rises to exactly 1 on its last step and never exceeds 1.
    """
    o = cfg.optim
    # the tolerance keeps e.g. 0.1 epochs x 30 steps (3.0000000000000004) at 3 steps
    warm = math.ceil(o.warmup_epochs * steps_per_epoch - 1e-9)
    total = o.epochs * steps_per_epoch

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if o.schedule == "cosine":
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if o.schedule == "multistep":
            epoch = step // steps_per_epoch
            return o.gamma ** sum(epoch >= m for m in o.milestones)
        return 1.0

    return fn


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch, CUDA, numpy, Python) as tensors and plain lists,
    loadable with ``weights_only=True``; :func:`set_rng_state` restores them."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple), "numpy's global RandomState is always MT19937"
    kind, keys, pos, has_gauss, gauss = np_state
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNG states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through :func:`~ltzoo.zoo.files.atomic_write`: a kill never leaves a
    half-written checkpoint."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _load_checkpoint(path: Path) -> dict[str, Any]:
    # Our own resume file (written by atomic_save above), never a downloaded one.
    return torch.load(path, map_location="cpu", weights_only=True)


def resumable(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint to resume: the method's own or one of its
    earlier stages' runs (a CBD run killed while training its teachers)."""
    return any(Path(run_dir).rglob(CHECKPOINT))


# DDP's keyword for "no buffer broadcast at every forward": ``forward_sync_buffers`` from
# torch 2.14 (``broadcast_buffers`` warns there), ``broadcast_buffers`` before it.
_NO_BUFFER_SYNC_PER_STEP: dict[str, Any] = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


class Trainer:
    """Runs one :class:`RunConfig`. Construct, then :meth:`fit`."""

    def __init__(
        self, cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.run.out or Path("runs") / cfg.recipe)
        self.resume = resume
        import torch.distributed as torch_dist

        self._owns_process_group = not (torch_dist.is_available() and torch_dist.is_initialized())
        self.dist = init_distributed(
            "cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu"
        )
        self.device = resolve_device(cfg.run.device, self.dist)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.precision: Precision = resolve_precision(cfg.run.precision, self.device)
        self.batch_augment: BatchAugment | None = None  # set by build_loader
        self.nonfinite_in_a_row = 0

    # -- building -------------------------------------------------------------------
    def build_data(self):
        from .data import build_lt_dataset, build_transforms

        d = self.cfg.data
        pre = get_entry(self.cfg.model).build_config().preprocess
        return build_lt_dataset(
            d.name,
            root=d.root or None,
            rho=d.rho,
            n_max=d.n_max or None,
            seed=d.seed,
            class_order=d.class_order or None,
            val_per_class=d.val_per_class,
            train_transform=build_transforms(pre, d.augment, train=True),
            eval_transform=build_transforms(pre, (), train=False),
            train_split=d.train_split or None,
            val_split=d.val_split or None,
            test_split=d.test_split or None,
            val_from_train=d.val_from_train,
            val_max_per_class=d.val_max_per_class,
        )

    def build_model(self, split) -> Ensemble:
        """The model of the registry entry with the recipe's overrides, the split's classes,
        the method (which decides the logit prior) and the initial backbone weights."""
        cfg, method_cls = self.cfg, METHODS[self.cfg.method]
        overrides = dict(cfg.model_overrides)
        extra = {
            **overrides.pop("extra", {}),
            "data": split.info,
            "precision": self.precision.record(),
        }
        if method_cls.card_notes:
            extra["card_notes"] = method_cls.card_notes
        config = get_entry(cfg.model).build_config(
            **{
                "method": cfg.method,
                "recipe": cfg.recipe,
                "name": cfg.run.model_name(self.run_dir),
                **overrides,
            },
            class_counts=list(split.class_counts),
            class_names=list(split.class_names),
            extra=extra,
        )
        return Ensemble(config, pretrained_backbone=cfg.pretrained_backbone or None)

    def build_loader(self, split, method: Method) -> DataLoader:
        """The training loader; sets ``self.batch_augment`` when whole uint8 batches are
        augmented on the device (in-memory datasets) instead of per sample in the loader."""
        from .data import build_sampler

        run = self.cfg.run
        pre = method.model.config.preprocess
        self.batch_augment = (
            batched_augment_for(split.train, pre, self.cfg.data.augment, run.channels_last)
            if run.batched_augment
            else None
        )
        dataset, collate = split.train, None
        if self.batch_augment is not None:
            self.batch_augment.to(self.device)
            dataset, collate = UInt8Batches(split.train.images, split.train.labels), collate_uint8
        sampler = build_sampler(
            method.sampler,
            split.train_labels,
            seed=self.cfg.data.seed + self.cfg.run.seed,
            num_replicas=self.dist.world_size,
            rank=self.dist.rank,
        )
        per_rank_batch = max(1, self.cfg.optim.batch_size // self.dist.world_size)
        return DataLoader(
            dataset,
            batch_size=per_rank_batch,
            sampler=sampler,
            collate_fn=collate,
            drop_last=True,
            num_workers=self.cfg.data.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def build_optimizer(self, method: Method) -> torch.optim.Optimizer:
        """SGD over the method's trainable parameters (lr scaled with the batch if asked)."""
        o = self.cfg.optim
        lr = o.lr * (o.batch_size / 256 if o.scale_lr_with_batch else 1.0)
        params = [p for p in method.parameters() if p.requires_grad]
        return torch.optim.SGD(
            params, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )

    # -- running --------------------------------------------------------------------
    def fit(self) -> Path:
        """Train the run's stages (or resume them): each earlier stage's runs
        (:meth:`run_stage`), then the method itself (evaluated on the test set and saved
        as ``model/``). Returns the run dir."""
        method_cls = METHODS[self.cfg.method]
        stages = self.cfg.stage_names()
        self._write_run_json({})  # --resume finds the settings while earlier stages train
        for stage in stages:
            if stage != method_cls.stages[-1]:
                for run in method_cls.stage_runs(self.cfg, stage):
                    self.run_stage(run)
        if method_cls.stages[-1] in stages:
            self._fit_method()
        if self._owns_process_group:  # a stage's run leaves the group to its caller
            cleanup(self.dist)
        return self.run_dir

    def run_stage(self, run: StageRun) -> Path:
        """Train one run of an earlier stage in ``<run dir>/<run.subdir>``, with the engine's
        own resume semantics: a finished run (``model/`` saved) is kept, an interrupted one
        resumes from its checkpoint, a missing one is trained. A directory holding a run
        of another configuration is an error. Returns the stage run's directory."""
        run_dir = self.run_dir / run.subdir
        check_same_run(run_dir, run.config)
        if not (run_dir / "model" / CONFIG_NAME).is_file():
            train(run.config, run_dir, resume=True)
        return run_dir

    def prepare(self, method: Method, split) -> None:
        """The method's hook before training (CBD loads its teachers); the global RNG state
        is restored after it, so what the hook draws (evaluation loaders) does not change
        the training stream."""
        state = rng_state()
        try:
            method.prepare({"trainer": self, "split": split})
        finally:
            set_rng_state(state)

    def _fit_method(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.run.seed)
        split = self.build_data()
        model = self.build_model(split)
        method = METHODS[cfg.method](
            model, split.class_counts, METHODS[cfg.method].Params.from_dict(cfg.method_params)
        )
        self.prepare(method, split)
        method.to(self.device)
        if cfg.run.channels_last:
            method.to(memory_format=torch.channels_last)
        if self.dist.enabled and cfg.run.sync_bn and self.device.type == "cuda":
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
        loader = self.build_loader(split, method)
        steps = (
            len(loader)
            if not cfg.run.max_steps_per_epoch
            else min(len(loader), cfg.run.max_steps_per_epoch)
        )
        optimizer = self.build_optimizer(method)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
        scaler = self.grad_scaler()
        ddp = (
            DistributedDataParallel(
                method,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
                **_NO_BUFFER_SYNC_PER_STEP,
            )
            if self.dist.enabled
            else method
        )
        # Buffers go from rank 0 once, here, not at every step: the methods keep theirs the
        # same on every rank (MoCo queues; ECL's class weights, updated from every rank's
        # batch), a training forward uses batch statistics, and BatchNorm's running statistics
        # are averaged before each checkpoint (ImageNet-LT's MoCo queues alone: 100 MB a step).
        self._broadcast_buffers(method)
        forward = self.forward_for(ddp)

        start_epoch = 0
        ckpt_path = self.run_dir / CHECKPOINT
        if self.resume and ckpt_path.is_file():
            state = _load_checkpoint(ckpt_path)
            method.load_state_dict(state["method"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            start_epoch = state["epoch"] + 1
        self._write_run_json(split.info)
        writer = self._tensorboard()

        for epoch in range(start_epoch, cfg.optim.epochs):
            loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
            ddp.train()
            logs = self._train_epoch(
                forward, method, loader, steps, optimizer, scheduler, scaler, epoch
            )
            self._average_buffers(method)  # every rank evaluates and saves the same model
            if (
                cfg.run.eval_every
                and (epoch + 1) % cfg.run.eval_every == 0
                and split.val is not None
            ):
                from .evaluate import evaluate

                logs["val"] = evaluate(
                    method.model,
                    split.val,
                    split.class_counts,
                    cfg.run.eval_batch_size,
                    self.device,
                )["accuracy"]
            if self.dist.is_main:
                atomic_save(
                    {
                        "method": method.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng": rng_state(),
                        "epoch": epoch,
                    },
                    ckpt_path,
                )
                # logged once saved: an epoch a resume repeats was never logged (no duplicates)
                self._log({"epoch": epoch, **logs}, writer, epoch)
            barrier(self.dist)
        self._record_ddp(method, loader)
        if self.dist.is_main:
            self._finish(method.model, split)
        barrier(self.dist)

    def _write_run_json(self, data_info: dict[str, Any]) -> None:
        """``run.json``: the run's settings (what ``--resume`` continues with) and its data."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run = {
                "config": self.cfg.to_dict(),
                "precision": self.precision.record(),
                "data": data_info,
            }
            write_json(self.run_dir / "run.json", run, default=str)

    def device_batch(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader batch on the training device, augmented there when the batched path is on,
        in the model's memory format."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.batch_augment is not None:
            return self.batch_augment(images), labels
        if self.cfg.run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def forward_for(self, module: torch.nn.Module) -> Callable[..., Any]:
        """What a training step calls: ``module``, or with ``run.compile`` the module under
        ``torch.compile`` (static shapes, compiled on the first steps); state dicts and
        checkpoints stay those of the module."""
        return torch.compile(module, dynamic=False) if self.cfg.run.compile else module

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The loss scaler: active for fp16 autocast on CUDA only (a no-op otherwise)."""
        return torch.amp.GradScaler("cuda", enabled=self.precision.needs_grad_scaler)

    def train_step(
        self, forward, method, optimizer, scaler, images, labels, where: str = ""
    ) -> tuple[torch.Tensor, dict[str, float]] | None:
        """One optimisation step (forward in the run's precision, non-finite check, backward,
        clip, step, EMA hooks); ``forward`` is ``method`` itself, its DDP wrapper, or either
        one compiled. A non-finite loss skips the step (None; see :meth:`skip_nonfinite`)."""
        with self.precision.autocast():
            loss, parts = forward(images, labels)
        if not all_ranks_finite(loss):
            self.skip_nonfinite(loss, parts, where)
            return None
        self.nonfinite_in_a_row = 0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.cfg.optim.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(method.parameters(), self.cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        method.after_step()
        return loss, parts

    def skip_nonfinite(self, loss: torch.Tensor, parts: dict[str, float], where: str) -> None:
        """Log a skipped step; :data:`MAX_NONFINITE_STEPS` in a row stop the run with a
        message naming the setting to change."""
        self.nonfinite_in_a_row += 1
        whose = "on another rank" if torch.isfinite(loss) else loss.item()
        logger.warning("non-finite loss %s at %s %s: step skipped", whose, where, parts or "")
        if self.nonfinite_in_a_row < MAX_NONFINITE_STEPS:
            return
        fix = (
            "run.precision=fp32 (this run computes in "
            f"{self.precision.used}), or a lower optim.lr / an optim.grad_clip"
            if self.precision.used != "fp32"
            else "a lower optim.lr, or optim.grad_clip (e.g. 5.0)"
        )
        raise FloatingPointError(
            f"{self.nonfinite_in_a_row} non-finite losses in a row (last at {where}): the run "
            f"diverged. Try {fix}, then resume with --resume"
        )

    def _train_epoch(
        self, forward, method, loader, steps, optimizer, scheduler, scaler, epoch
    ) -> dict[str, Any]:
        totals: dict[str, float] = {}
        seen = skipped = 0
        t0 = time.perf_counter()
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}",
            disable=not self.dist.is_main,
            leave=False,
            dynamic_ncols=True,
        )
        for step, (images, labels) in enumerate(loader):
            if step >= steps:
                break
            images, labels = self.device_batch(images, labels)
            stepped = self.train_step(
                forward, method, optimizer, scaler, images, labels, f"epoch {epoch} step {step}"
            )
            scheduler.step()  # the schedule moves on over a skipped step, as with AMP's scaler
            seen += images.shape[0]
            if stepped is None:
                skipped += 1
                bar.update()
                continue
            loss, parts = stepped
            for k, v in {"loss": loss.item(), **parts}.items():
                totals[k] = totals.get(k, 0.0) + v
            bar.set_postfix(
                loss=f"{loss.item():.3f}",
                lr=f"{scheduler.get_last_lr()[0]:.4f}",
                img_s=f"{seen / (time.perf_counter() - t0):.0f}",
                refresh=False,  # update() redraws at tqdm's mininterval (TQDM_MININTERVAL)
            )
            bar.update()
        bar.close()
        n = max(1, min(steps, len(loader)) - skipped)
        return {
            **{k: v / n for k, v in totals.items()},
            **({"skipped_steps": skipped} if skipped else {}),
            "lr": scheduler.get_last_lr()[0],
            "images_per_s": seen * self.dist.world_size / (time.perf_counter() - t0),
            "epoch_s": time.perf_counter() - t0,
            "threads": torch.get_num_threads(),  # a resumed run may be given other threads
        }

    def _broadcast_buffers(self, method: Method) -> None:
        """Start every rank from rank 0's buffers, whatever the torch version (from 2.14 DDP
        does so at its start too; before, with ``broadcast_buffers=False``, it does not)."""
        if not self.dist.enabled:
            return
        import torch.distributed as dist

        for buf in method.buffers():
            dist.broadcast(buf, src=0)

    def _average_buffers(self, method: Method) -> None:
        """Average BatchNorm running statistics over ranks (as timm's distribute_bn, after every
        epoch), so every rank holds the same model: DDP keeps parameters in sync, but each
        rank's forward passes update its own running statistics."""
        if not self.dist.enabled:
            return
        import torch.distributed as dist

        for buf in method.model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf /= self.dist.world_size

    def _record_ddp(self, method: Method, loader: DataLoader) -> None:
        """Under torchrun, write ddp.json: per rank a weight checksum and the shard it trained on."""
        if not self.dist.enabled:
            return
        import torch.distributed as dist

        mine = {
            "rank": self.dist.rank,
            "weights_sha256": method.model.weights_digest().hexdigest(),
            "last_epoch_indices": [int(i) for i in loader.sampler],
        }
        gathered: list = [None] * self.dist.world_size
        dist.all_gather_object(gathered, mine)
        if self.dist.is_main:
            write_json(self.run_dir / "ddp.json", gathered)

    def _tensorboard(self):
        if not (self.cfg.run.tensorboard and self.dist.is_main):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(self.run_dir / "tensorboard")

    def _log(self, row: dict[str, Any], writer, epoch: int) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
        if writer is not None:
            for k, v in row.items():
                if isinstance(v, int | float):
                    writer.add_scalar(k, v, epoch)

    def _finish(self, model: Ensemble, split) -> None:
        """Evaluate on the test set, fit the temperature on val, save the ensemble."""
        from .evaluate import calibrate_and_evaluate

        if self.cfg.run.eval_subset:
            from torch.utils.data import Subset

            step = max(1, len(split.test) // self.cfg.run.eval_subset)
            split.test = Subset(
                split.test, range(0, len(split.test), step)[: self.cfg.run.eval_subset]
            )
        results = calibrate_and_evaluate(
            model,
            split,
            self.cfg.run.eval_batch_size,
            self.device,
            plots_dir=self.run_dir / "plots",
        )
        results["precision"] = self.precision.record()
        write_json(self.run_dir / "results.json", results)
        # published weights are plain contiguous tensors whatever layout trained them
        model.cpu().to(memory_format=torch.contiguous_format).save_pretrained(
            self.run_dir / "model"
        )


def train(cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False) -> Path:
    """Train ``cfg``; the run directory ends up holding ``model/`` (a saved :class:`zoo.Ensemble`)."""
    return Trainer(cfg, run_dir, resume).fit()
